"""Proving a peer is a worker of this cluster before it counts: one Describe, and why not.

A peer counts toward `--workers` (and may be placed) only once it has answered a Describe
over mutual TLS with this cluster's CA and speaks this coordinator's protocol. Anything
else (a plaintext server, a certificate from another CA, a port that accepts and says
nothing, a closed port) is refused with a reason that says what happened.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

from mtpdist.errors import MtpdistError, WorkerCallError
from mtpdist.wire.auth import is_handshake_failure
from mtpdist.wire.client import ChannelSettings, WorkerClient
from mtpdist.wire.types import PROTOCOL_VERSION, WorkerInfo

# A worker's first Describe measures its weight-read speed (seconds on a busy machine). Peers
# are vetted in parallel and a wait ends as soon as enough have proven themselves, so a slow
# or silent peer costs no time; one without the secret fails its handshake at once.
VET_TIMEOUT = 20.0


@dataclass(frozen=True)
class Verdict:
    """What one Describe told about a peer: its info, or why it is refused."""
    address: str
    info: WorkerInfo | None = None
    reason: str = ""              # empty when proven
    secret: bool = False          # refused because it could not prove it holds the cluster secret

    @property
    def proven(self) -> bool:
        return self.info is not None


def refusal_reason(code: str, details: str, elapsed: float, secure: bool) -> tuple[str, bool]:
    """Why a Describe failed, in words, and whether it is a (mutual TLS) secret failure.

    A TLS handshake that got no answer (a stopped or hung process, a tarpit) is not a wrong
    secret: it is reported as no answer, with how long we waited.
    """
    d = details.lower()
    if "connection refused" in d:
        return "nothing accepts connections on its port (connection refused)", False
    if code == "DEADLINE_EXCEEDED" or "timed out" in d or "endpoint closing" in d or "handshake read failed" in d:
        return (f"no answer within {elapsed:.1f} s (it accepted the connection but said nothing: stopped, "
                "hung, or not an mtpdist worker)"), False
    if secure and "wrong_version_number" in d:
        return ("it does not speak TLS (a plaintext server): it did not prove it holds the cluster secret"), True
    if is_handshake_failure(code, details):
        return ("it did not prove it holds the cluster secret (mutual TLS handshake failed; either it or this "
                "coordinator has a different secret)"), True
    if not secure and "socket closed" in d:
        return ("it closed the plaintext connection (a worker that does this most likely requires mutual TLS: "
                "use the cluster secret, not --insecure)"), False
    return f"{code}: {details}", False


def reason_kind(reason: str) -> str:
    """A refusal's reason without its timings: a peer is logged again only when this changes."""
    return re.sub(r"\d+(\.\d+)? s\b", "N s", reason)


def vet(address: str, channel: ChannelSettings, timeout: float = VET_TIMEOUT) -> Verdict:
    """Describe `address` (within `timeout`); a Verdict that proves it or says why not. Never raises."""
    t0 = time.monotonic()
    try:
        client = WorkerClient(address, replace(channel, timeout=timeout))
    except MtpdistError as e:  # plaintext to a non-loopback address without --allow-insecure-network
        return Verdict(address, reason=str(e))
    try:
        info = client.describe()
    except WorkerCallError as e:
        reason, secret = refusal_reason(e.code, e.details, time.monotonic() - t0, channel.identity is not None)
        return Verdict(address, reason=reason, secret=secret)
    except (MtpdistError, ValueError) as e:  # a reply that does not decode as a DescribeReply
        return Verdict(address, reason=f"its reply is not a worker's: {e}")
    finally:
        client.close()
    if info.protocol_version != PROTOCOL_VERSION:
        return Verdict(address, reason=f"it speaks protocol {info.protocol_version}, this coordinator "
                                       f"{PROTOCOL_VERSION}; upgrade mtpdist on both")
    return Verdict(address, info=info)
