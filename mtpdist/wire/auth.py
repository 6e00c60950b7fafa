"""Bearer-token authentication for every RPC, and TLS credentials."""

from __future__ import annotations

import hmac
import logging

import grpc

log = logging.getLogger("mtpdist.auth")
HEADER = "authorization"


def metadata(token: str | None) -> tuple:
    """Call metadata carrying the cluster token."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses any call whose bearer token differs from the cluster's (constant-time compare)."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata or ()).get(HEADER, "")
        if hmac.compare_digest(got.encode(), self.expected):
            return continuation(details)
        reason = "no token" if not got else "wrong token"
        log.warning("refused %s: %s", details.method, reason)

        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reason}: this worker needs the cluster token")
        handler = continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    """TLS credentials for a worker."""
    with open(cert, "rb") as c, open(key, "rb") as k:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


def channel_credentials(ca: str) -> grpc.ChannelCredentials:
    """TLS trust for calling workers."""
    with open(ca, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())
