"""Domain error kinds to and from gRPC status codes: the only place that knows both."""

from __future__ import annotations

import grpc

from ..errors import WorkerCallError

_TO_CODE = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
    "state_lost": grpc.StatusCode.NOT_FOUND,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
    "data_loss": grpc.StatusCode.DATA_LOSS,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.UNKNOWN,
}
_FROM_CODE = {code.name: kind for kind, code in _TO_CODE.items()}
# No answer at all: the worker or the link to it is gone, hung or restarting.
_LOST = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "INTERNAL"}


def status_of(kind: str) -> grpc.StatusCode:
    """The gRPC status a worker answers for a domain error kind."""
    return _TO_CODE.get(kind, grpc.StatusCode.UNKNOWN)


def kind_of(code: str, details: str = "") -> str:
    """The domain kind of a failed call's gRPC status name."""
    if code in _LOST:       # (bar a message gRPC itself could not (de)serialize: that fails again)
        return "invalid" if "serializ" in details else "lost"
    return _FROM_CODE.get(code, "internal")


def call_error(address: str, err: grpc.RpcError) -> WorkerCallError:
    """A WorkerCallError for a failed gRPC call."""
    code, details = err.code().name, err.details() or ""
    return WorkerCallError(address, kind_of(code, details), code, details)


def worker_error(address: str, code: str, details: str) -> WorkerCallError:
    """A WorkerCallError from a status name (a call abandoned, a liveness probe unanswered)."""
    return WorkerCallError(address, kind_of(code, details), code, details)
