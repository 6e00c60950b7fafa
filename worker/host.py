"""What a worker says about its machine: which machine it is, and what memory it offers.

Several workers may run on one machine. Each offers its share of RAM (75% by default, or
--memory-share / --usable-memory-gb) and reports the machine's identity and total memory;
the coordinator's placement makes workers of one machine share one budget, so no worker
needs a flag for a local try and none can over-commit the machine.
"""

from __future__ import annotations

import hashlib
import socket
import uuid

from mtpdist.errors import MtpdistError
from mtpdist.placement import HOST_SHARE


def host_id() -> str:
    """A stable, non-identifying name of this machine: equal for every worker running on it."""
    return hashlib.sha256(f"{socket.gethostname()}/{uuid.getnode():012x}".encode()).hexdigest()[:16]


def offer(asked: int | None, memory: int, share: float | None = None) -> int:
    """Bytes this worker offers: `asked`, else `share` (default 75%) of the machine's RAM."""
    if asked is not None:
        return asked
    share = HOST_SHARE if share is None else share
    if not 0 < share <= 1:
        raise MtpdistError(f"--memory-share must be in (0, 1], got {share:g}")
    return int(memory * share)
