"""The protocol source's chunks made ahead of the trainer, in a worker process.

A ``ProtocolSource`` chunk (``bucket`` micro-batches: the teacher's or a Q-learner's play on Numba, the switches,
the collation, the transitions and the memory's features) is a pure function of its key ``(chunk, rank...)``, so
another process can make the next one while the trainer trains on this one: ``PrefetchSource`` hands out exactly the
batches the source itself would (tested), only sooner. The worker builds its own copy of the source once (from the
same arguments) and makes chunk ``k + 1 .. k + ahead`` as soon as the trainer starts on chunk ``k``; a chunk that is
not ready (the first, a resumed run's) is made in the trainer's process as before. Chunks the model plays (DAgger,
``--protocol.behaviour self``) need the trainer's network, so those sources are not prefetched.

The worker runs one thread (its Numba play and numpy work), leaving the rest of the machine to the trainer, whose
thread budget (``icrl_fast.threads``) sees it as load. It is stopped when the source is collected or the process
exits (``close``).
"""

from __future__ import annotations

import multiprocessing
import weakref
from concurrent.futures import Future, ProcessPoolExecutor

_SOURCE = None  # the worker process's own source


def _start_worker(factory) -> None:
    global _SOURCE
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    _SOURCE = factory()


def _make_chunk(key: tuple) -> list[dict]:
    return _SOURCE._make_chunk(key)


class PrefetchSource:
    """``factory()`` builds the ``ProtocolSource`` (here and in the worker: it must pickle, e.g. a
    ``functools.partial``); ``ahead`` chunks are made ahead. ``batch`` and anything else is the source's own
    (``__getattr__``): only where its chunks come from changes."""

    def __init__(self, factory, ahead: int = 1):
        if ahead < 1:
            raise ValueError(f"prefetch needs ahead >= 1 chunks, got {ahead}")
        self.source = factory()
        if self.source.engine is not None:
            raise ValueError("--protocol.prefetch makes chunks in a worker process, without the model: not with "
                             "--protocol.dagger > 0 or --protocol.behaviour self (set --protocol.prefetch 0)")
        self.ahead = ahead
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(factory,))
        self.pending: dict[tuple, Future] = {}
        self.from_worker = 0  # chunks the worker made (the rest: made here, when not ready in time)
        self.source.make_chunk = self._fetch  # the source's own batch() now takes its chunks from here
        self._finalizer = weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)

    def _fetch(self, key: tuple) -> list[dict]:
        """Chunk ``key`` (the source's ``make_chunk``): the worker's when it was asked for, else made here; then the
        next ``ahead`` chunks are asked for."""
        made = self.pending.pop(key, None)
        self.from_worker += made is not None
        chunk = made.result() if made is not None else self.source._make_chunk(key)
        for old in [k for k in self.pending if k[0] < key[0]]:  # a jump back (none in a run): drop what is stale
            self.pending.pop(old).cancel()
        for ahead in range(1, self.ahead + 1):
            nxt = (key[0] + ahead, *key[1:])
            if nxt not in self.pending:
                self.pending[nxt] = self.pool.submit(_make_chunk, nxt)
        return chunk

    def close(self) -> None:
        """Stop the worker (pending chunks are dropped)."""
        self._finalizer()

    def __getattr__(self, name):
        return getattr(self.source, name)
