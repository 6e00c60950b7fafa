"""Mutual TLS between cluster members: gRPC credentials from a node identity.

Both ends present a certificate chained to the cluster CA (see mtpdist.security), so a
worker serves only callers that hold the cluster secret (the coordinator and the previous
stage alike), and the coordinator and each stage talk only to peers that hold it too.
No secret or bearer token travels in any call.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import grpc

# Substrings of gRPC's details when a TLS handshake failed (the peer's certificate is not
# from this cluster's CA, or the peer does not speak TLS at all).
_HANDSHAKE_SIGNS = ("handshake", "certificate_verify_failed", "tsi_", "ssl", "tls")


@dataclass(frozen=True)
class TlsIdentity:
    """PEM bytes of the cluster CA, this node's certificate and key, and the name peers carry."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    server_name: str
    fingerprint: str = ""   # names the cluster CA (not secret): equal on every node holding the same secret


def server_credentials(identity: TlsIdentity) -> grpc.ServerCredentials:
    """Serve TLS with this node's certificate; require callers' certificates chained to the CA."""
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem,
                                       require_client_auth=True)


def channel_credentials(identity: TlsIdentity) -> grpc.ChannelCredentials:
    """Trust only the cluster CA, and present this node's certificate to the worker."""
    return grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.key_pem,
                                        certificate_chain=identity.cert_pem)


def channel_options(identity: TlsIdentity) -> list[tuple[str, object]]:
    """Check the peer's certificate against the fixed cluster name, whatever address was dialed."""
    return [("grpc.ssl_target_name_override", identity.server_name)]


def is_handshake_failure(code: str, details: str) -> bool:
    """Whether a failed call means the peer could not prove cluster membership (or we could not)."""
    d = details.lower()
    return code == "UNAVAILABLE" and any(s in d for s in _HANDSHAKE_SIGNS)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or host:port) names this machine's loopback interface."""
    h = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    h = h.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
