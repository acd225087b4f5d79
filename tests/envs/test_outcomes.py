"""icrl_fast.envs.outcomes: a step's class from what any discrete environment returns, and the surprise rule."""

import numpy as np

from icrl_fast.envs.outcomes import ENDED_REWARDED, ENDED_UNREWARDED, MOVED, STAYED, outcome_class, surprised


def test_outcome_classes_come_from_the_step_not_the_map():
    assert outcome_class(False, False, False) == MOVED
    assert outcome_class(True, False, False) == STAYED
    assert outcome_class(False, True, True) == outcome_class(True, True, True) == ENDED_REWARDED
    assert outcome_class(False, True, False) == ENDED_UNREWARDED
    assert len({MOVED, STAYED, ENDED_UNREWARDED, ENDED_REWARDED}) == 4


def test_a_surprise_is_an_outcome_that_differs_from_the_last_one_and_empties_what_was_known():
    known = np.full((5, 4), -1, dtype=np.int64)
    assert not surprised(known, 2, 1, MOVED)  # first time: nothing to contradict
    assert not surprised(known, 3, 0, STAYED)
    assert not surprised(known, 2, 1, MOVED)  # the same again
    assert surprised(known, 2, 1, ENDED_UNREWARDED)  # a changed environment
    assert known[3, 0] == -1 and known[2, 1] == ENDED_UNREWARDED  # wiped, then the new outcome recorded
