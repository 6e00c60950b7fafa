"""What the workers on one machine offer: one memory budget shared, one id per port.

Each worker records its offer in the config folder (`workers/<port>.json`, with its pid);
a worker started without --usable-memory-gb offers 75% of RAM minus what the other live
workers on this machine already offer, so two workers never promise the same memory twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mtpdist.errors import MtpdistError

SHARE = 0.75
MIN_OFFER = 1 << 30


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def others_offer(directory: Path, port: int) -> int:
    """Bytes offered by the other live workers recorded in `directory` (stale records are removed)."""
    total = 0
    for f in (directory / "workers").glob("*.json"):
        try:
            rec = json.loads(f.read_text())
            pid, their_port, usable = int(rec["pid"]), int(rec["port"]), int(rec["usable"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if their_port == port or pid == os.getpid():
            continue
        if not _alive(pid):
            f.unlink(missing_ok=True)
            continue
        total += usable
    return total


def claim_memory(directory: Path, port: int, asked: int | None, memory: int) -> int:
    """This worker's offer (asked, or its share of what is left), recorded for the others."""
    offer = asked
    if offer is None:
        taken = others_offer(directory, port)
        offer = int(memory * SHARE) - taken
        if offer < MIN_OFFER:
            raise MtpdistError(f"other workers on this machine already offer {taken / 2**30:.1f} GiB of the "
                               f"{memory * SHARE / 2**30:.1f} GiB (75% of RAM) a worker may use by default; "
                               "give each worker its share with --usable-memory-gb")
    try:
        (directory / "workers").mkdir(parents=True, exist_ok=True)
        (directory / "workers" / f"{port}.json").write_text(json.dumps(
            {"pid": os.getpid(), "port": port, "usable": offer}))
    except OSError:
        pass  # a read-only config folder: the offer stands, unrecorded
    return offer


def release_memory(directory: Path, port: int) -> None:
    """Forget this worker's offer (at shutdown)."""
    f = directory / "workers" / f"{port}.json"
    try:
        if json.loads(f.read_text()).get("pid") == os.getpid():
            f.unlink()
    except (OSError, ValueError):
        pass
