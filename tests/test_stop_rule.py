import pytest

from fineprune.purify.stop_rules import stop_point


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


def test_bound_rule_prunes_nothing_it_cannot_vouch_for_and_meets_the_paper_rule_at_scale():
    # 40 images at 92.5%: the sampling bound alone (6.8 points) exceeds a 4-point threshold
    assert stop_point([37, 37, 36, 35, 30], 40, 4.0) == 2
    assert stop_point([37, 37, 36, 35, 30], 40, 4.0, "bound") == 0
    # 10,000 images: the bound (0.4 points at 95%) barely moves the paper's stop point
    counts = [9500, 9500, 9450, 9300, 9120, 9050]
    assert stop_point(counts, 10_000, 4.0) == 4 and stop_point(counts, 10_000, 4.0, "bound") == 3
    with pytest.raises(ValueError):
        stop_point(counts, 10_000, 4.0, "loose")
