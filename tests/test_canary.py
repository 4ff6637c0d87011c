"""The canary's routing (deploy/canary.py): shares as the registry states them, and keys' sides."""
import pytest

from deploy.canary import BUCKETS, CanaryRoute, ShareError, bucket, parse_share


@pytest.mark.parametrize("value, share", [(None, 0.0), ("", 0.0), ("0", 0.0), ("12.5", 12.5), ("100", 100.0), (25, 25.0)])
def test_a_share_is_a_percent_and_no_tag_is_none(value, share):
    assert parse_share(value) == share


@pytest.mark.parametrize("value", ["-1", "100.5", "ten", "nan", "inf"])
def test_a_share_that_is_not_a_percent_is_refused_naming_the_fix(value):
    with pytest.raises(ShareError, match=r"is not a percent from 0 to 100: set it with `graft canary set PERCENT`"):
        parse_share(value)


def test_a_ramp_moves_no_key_back_and_each_share_takes_its_part_of_the_keys():
    keys = [f"user-{i}" for i in range(20_000)]
    assert all(0 <= bucket(key) < BUCKETS for key in keys[:100]) and bucket("user-1") == bucket("user-1")
    taken = {share: {key for key in keys if CanaryRoute("v2", share).takes(key)} for share in (0, 5, 25, 100)}
    assert taken[0] == set() and taken[100] == set(keys)
    assert taken[5] < taken[25]  # a key on the canary at 5% stays on it at 25%
    for share in (5, 25):  # uniform: within 4.5 binomial standard deviations of the share
        expected = len(keys) * share / 100
        assert abs(len(taken[share]) - expected) < 4.5 * (expected * (1 - share / 100)) ** 0.5
