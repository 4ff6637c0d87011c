"""deploy/budget.py: side work held to a share of one core, on a clock the test drives."""
import pytest

from deploy.budget import CpuBudget


def test_work_that_took_t_keeps_the_next_piece_off_for_t_over_the_share():
    budget = CpuBudget(0.25)  # times below are exact in binary: no rounding decides a comparison
    assert budget.take(now=100.0)  # nothing measured yet: the first piece starts at once
    budget.spent(started=100.0, seconds=0.5)  # half a second at a quarter of a core: the next 2 s after it started
    assert not budget.take(now=101.75)
    assert budget.take(now=102.0)
    # Taken, it reserves the last piece's cost until its own is known: a second piece cannot slip in meanwhile.
    assert not budget.take(now=102.25)
    budget.spent(started=102.0, seconds=1.0)  # dearer this time: 4 s
    assert not budget.take(now=105.75)
    assert budget.take(now=106.0)


def test_a_piece_that_never_reports_holds_the_budget_only_for_its_reservation():
    budget = CpuBudget(0.5)
    budget.take(now=0.0)
    budget.spent(started=0.0, seconds=1.0)
    assert budget.take(now=2.0)  # its request went away: spent() never comes
    assert not budget.take(now=3.9)
    assert budget.take(now=4.0)  # reserved for the last cost over the share, then free again


@pytest.mark.parametrize("share", [0, -0.1, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        CpuBudget(share)
