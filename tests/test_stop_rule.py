import pytest

from fineprune.defense.stop_rule import stop_point


def test_threshold_zero_stops_at_first_drop():
    assert stop_point([90, 90, 91, 89, 95], 100, 0.0) == 2


def test_threshold_hundred_prunes_everything():
    assert stop_point([90, 50, 10, 0], 100, 100.0) == 3


def test_non_monotone_stops_at_first_violation_not_last_ok():
    # k=3 is below the 4-point band, k=4 recovers; pruning stops before k=3.
    assert stop_point([100, 99, 97, 95, 99, 98], 100, 4.0) == 2


def test_boundary_is_inclusive_and_uses_counts():
    # 200 samples, 4 points = 8 samples: a drop of exactly 8 is allowed, 9 is not.
    assert stop_point([180, 172, 171], 200, 4.0) == 1


def test_first_step_already_past_threshold():
    assert stop_point([100, 10, 100], 100, 4.0) == 0


@pytest.mark.parametrize("bad", [-1, 100.5, float("nan")])
def test_threshold_out_of_range(bad):
    with pytest.raises(ValueError, match="threshold"):
        stop_point([1, 1], 1, bad)
