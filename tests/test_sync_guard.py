"""The host-sync guard (``icrl_fast.sync_guard``) catches every way a step can read device data on the host, and
lets through what stays on the device: the guard the player's and the training step's ``*no_sync*`` tests rely on."""

import numpy as np
import pytest
import torch

from icrl_fast.sync_guard import HostSyncError, no_host_sync

X = torch.arange(6.0)


def _bool_put():
    y = X.clone()
    y[X > 2] = 1.0


SYNCS = {
    "item": lambda: X[0].item(),
    "int": lambda: int(X.sum()),
    "float": lambda: float(X[0]),
    "bool": lambda: bool(X.sum() > 0),
    "if": lambda: 1 if (X > 2).any() else 0,
    "nonzero": lambda: X.nonzero(),
    "bool index": lambda: X[X > 2],
    "bool index_put": _bool_put,
    "masked_select": lambda: X.masked_select(X > 2),
    "unique": lambda: X.unique(),
    "cpu": lambda: X.cpu(),
    "numpy": lambda: X.numpy(),
    "np.asarray": lambda: np.asarray(X),
    "tolist": lambda: X.tolist(),
    "to another device": lambda: X.to("meta"),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_no_sync_guard_refuses(name):
    with pytest.raises(HostSyncError), no_host_sync():
        SYNCS[name]()


def test_no_sync_guard_allows_device_ops_and_restores_methods():
    idx = torch.tensor([1, 2])
    with no_host_sync():
        y = torch.where(X > 2, X, torch.zeros(())) + X.flip(0)
        y = y.scatter(0, idx, X[idx]) + X.index_select(0, idx).sum()
        y[idx] = 0.0
        z = torch.nn.functional.linear(y[None], torch.ones(3, 6)).to(torch.float64)
    assert z.shape == (1, 3)
    assert X[1].item() == 1.0 and X.tolist()[2] == 2.0 and X.cpu() is X  # the methods are back
    with pytest.raises(HostSyncError), no_host_sync():
        raise_inside = X[0].item()  # noqa: F841
    assert X[0].item() == 0.0  # restored after an error too
