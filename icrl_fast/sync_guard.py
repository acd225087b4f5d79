"""A guard that fails on any host synchronisation inside a step, on the CPU as on a GPU.

A GPU step that reads a device value on the host (``.item()``, ``int(t)``, ``if t.any():``, ``nonzero``, boolean
indexing, ``.cpu()``/``.numpy()``/``.tolist()``, a Numba or numpy call on a tensor's data) stalls the host until
the device has caught up, and a CUDA graph cannot capture it. ``torch.cuda.set_sync_debug_mode("error")`` finds
these on a GPU; ``no_host_sync()`` finds them on any device, so a step is proven sync-free by a CPU test:

* a ``TorchDispatchMode`` refuses the aten ops whose result the host must read or whose output shape depends on the
  data: ``_local_scalar_dense`` (what ``.item()``, ``int()``, ``float()``, ``bool()`` call), ``nonzero``,
  ``masked_select``, ``unique`` and friends, boolean-mask ``index``/``index_put``, and any copy to another device;
* the tensor methods that hand data to the host without an aten op (``.numpy()``, ``.tolist()``, ``.cpu()``,
  ``__array__``, ``__bool__``) are patched to raise while the guard is on.

``HostSyncError`` names the op. Allowed inside: everything that stays a tensor op on the tensors' device, including
``torch.where``, ``scatter``/``gather``, ``index_select`` and integer-tensor indexing (``x[idx]``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: aten ops whose result the host reads, or whose output shape depends on the values (a read on a GPU)
#: (``nonzero_static`` is not one: its output size is fixed, so nothing is read back)
SYNC_OPS = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default, _aten._unique.default,
    _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.argwhere.default,
    _aten.repeat_interleave.Tensor, _aten.masked_scatter.default, _aten.equal.default, _aten.is_nonzero.default,
}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_METHODS = ("numpy", "tolist", "cpu", "__array__", "__bool__", "item")


class HostSyncError(RuntimeError):
    """A host synchronisation inside a ``no_host_sync`` block."""


def _devices(args) -> set:
    out = set()
    for a in args:
        if isinstance(a, torch.Tensor):
            out.add(a.device)
        elif isinstance(a, (list, tuple)):
            out |= _devices(a)
    return out


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            raise HostSyncError(f"host sync inside a guarded step: aten.{func.__name__} reads device data on the host")
        if func in _INDEX_OPS:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
                raise HostSyncError("host sync inside a guarded step: boolean-mask indexing (its output size is the "
                                    "mask's count): use torch.where or a fixed-size index")
        if func in _COPY_OPS:
            dev = kwargs.get("device")
            src = _devices(args)
            if dev is not None and any(torch.device(dev) != d for d in src) or len(src) > 1:
                raise HostSyncError(f"host sync inside a guarded step: aten.{func.__name__} copies across devices "
                                    f"({sorted(map(str, src))} -> {dev})")
        return func(*args, **kwargs)


def _refuse(name):
    def method(self, *args, **kwargs):
        raise HostSyncError(f"host sync inside a guarded step: Tensor.{name}() hands device data to the host")
    return method


@contextlib.contextmanager
def no_host_sync():
    """Raise ``HostSyncError`` at the first host synchronisation inside the block (see the module docstring)."""
    saved = {name: getattr(torch.Tensor, name) for name in _METHODS}
    try:
        for name in _METHODS:
            setattr(torch.Tensor, name, _refuse(name))
        with _Guard():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
