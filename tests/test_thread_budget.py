"""icrl_fast.threads: the thread budget follows the other processes' load, and torch and Numba both keep it."""

import numba
import numpy as np
import pytest
import torch

from icrl_fast import threads
from icrl_fast.envs.frozen_lake import FrozenLakeBatch
from icrl_fast.envs.maps import generate_maps


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads(), numba.get_num_threads()
    yield
    numba.set_num_threads(before[1])
    torch.set_num_threads(before[0])


def test_a_fixed_count_holds_in_torch_and_numba_across_a_simulator_step():
    """Numba's omp layer shares torch's OpenMP runtime: a parallel simulator step restores Numba's count, which
    used to put torch back at every core after torch.set_num_threads alone."""
    budget = threads.configure(1)
    assert budget.current == 1 and budget.poll() == 1 and torch.get_num_threads() == 1
    env = FrozenLakeBatch(generate_maps(8, seed=0), is_slippery=False, seed=0)
    env.reset()
    env.step(np.zeros(8, dtype=np.int64))
    assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1


class FakeMachine:
    """Stands in for /proc/stat, os.times and the clock: ``others`` cores of load elsewhere, this process busy on
    ``own`` cores, one second per reading."""

    def __init__(self, monkeypatch, cores=2):
        self.t, self.busy, self.mine, self.others, self.own = 0.0, 0.0, 0.0, 0.0, 1.0
        monkeypatch.setattr(threads, "_machine_busy_s", lambda: self.busy)
        monkeypatch.setattr(threads, "_own_cpu_s", lambda: self.mine)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(threads.time, "sleep", lambda s: self.tick(s))
        monkeypatch.setattr(threads, "affinity_cores", lambda: cores)

    def tick(self, seconds=1.0):
        self.t += seconds
        self.busy += (self.others + self.own) * seconds
        self.mine += self.own * seconds


def test_the_automatic_budget_drops_at_once_and_rises_after_two_quiet_readings(monkeypatch):
    m = FakeMachine(monkeypatch)
    budget = threads.configure(0, interval_s=1.0)
    assert budget.current == 2 and torch.get_num_threads() == 2  # a quiet machine: every core
    m.others = 1.0  # another process starts on one core
    m.tick()
    assert budget.poll() == 1 and torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    m.tick(0.5)
    assert budget.poll() == 1  # inside the interval: no new reading
    m.others = 0.0  # it stopped: two readings in a row before the budget rises
    m.tick()
    assert budget.poll() == 1
    m.tick()
    assert budget.poll() == 2 and torch.get_num_threads() == 2
    m.others = 0.4  # a short burst below half a core elsewhere keeps both cores
    m.tick()
    assert budget.poll() == 2 and budget.changes == 2


def test_a_process_that_starts_beside_a_busy_one_starts_with_the_free_cores(monkeypatch):
    m = FakeMachine(monkeypatch)
    m.others = 1.0
    assert threads.configure(0).current == 1
    m.others = 2.0  # everything busy elsewhere: still one thread, never zero
    m.tick()
    assert threads.poll() == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads"):
        threads.ThreadBudget(bad)
