"""The canary: a second version answering a share of live traffic. A request's side is decided by its key (the
client's key header, else its request id) through a hash, so one key stays on one side while the share holds, and a
ramp moves no one back: a key in the canary at 5% is in it at 25% too.

The share is live state in the registry (deploy/tags.py CANARY_SHARE_TAG, a percent), set by `graft canary` and
`graft promote --ramp` with an audit record each, and read by every server at each poll (ModelServer._follow_canary);
it takes effect at the change's scheduled moment (deploy/tags.py TRAFFIC_AT_TAG).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Generic, TypeVar

from deploy.tags import CANARY_SHARE_TAG

BUCKETS = 10_000  # a key's bucket: the share's resolution is 0.01%
KEY_HEADER_NOTE = "the key header (serving.canary.key_header), else the request id"
VersionT = TypeVar("VersionT")


class ShareError(ValueError):
    pass


def parse_share(value: str | float | None) -> float:
    """A canary share in percent, from the tag's text or a number; None or "" (no tag): 0. Raises ShareError naming
    the fix."""
    if value is None or value == "":
        return 0.0
    try:
        share = float(value)
    except ValueError:
        share = math.nan
    if not 0 <= share <= 100:  # NaN fails too
        raise ShareError(f"canary share {value!r} ({CANARY_SHARE_TAG}) is not a percent from 0 to 100: set it with "
                         f"`graft canary set PERCENT`")
    return share


def bucket(key: str) -> int:
    """The key's place in [0, BUCKETS): uniform over keys, the same for a key on every server and every run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % BUCKETS


@dataclass(frozen=True)
class CanaryRoute(Generic[VersionT]):
    """The canary as requests see it: the loaded version, and the share of keys it answers. Swapped whole."""

    served: VersionT
    share: float  # percent

    def takes(self, key: str) -> bool:
        return bucket(key) < self.share * (BUCKETS // 100)
