"""Errors that carry a message meant for the user, not a traceback."""


class MtpdistError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""


class ModelLoadError(MtpdistError):
    """A checkpoint cannot be loaded as asked (missing files, wrong shapes, no MTP head)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one mtpdist runs."""


class RequestError(MtpdistError):
    """A request that cannot be served; `code` names the gRPC status it maps to."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class WorkerCallError(MtpdistError):
    """A call to a worker failed; says which worker and why."""

    def __init__(self, address: str, code: str, message: str):
        super().__init__(f"worker {address}: {code}: {message}")
        self.address, self.code, self.details = address, code, message


# Transport-level codes: the worker (or the link to it) is gone, hung or restarting.
LOST = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "INTERNAL"}


def is_worker_loss(code: str, details: str = "") -> bool:
    """True when a failed worker call means a lost worker or lost state (recover by re-planning
    and replaying); False for a deterministic failure (a compute error, a bad request), which
    would fail again the same way after any number of re-plans and is reported once.
    """
    if code in LOST:                    # (bar a message gRPC itself could not (de)serialize)
        return "serializ" not in details
    if code == "NOT_FOUND":             # the worker no longer knows the sequence: it restarted
        return True
    if code == "FAILED_PRECONDITION":   # no shard loaded / cache not where we left it: restarted
        return True
    if code == "RESOURCE_EXHAUSTED":    # evicted (state lost) yes; a message over the size limit no
        return "evicted" in details
    return False                        # UNKNOWN (the worker raised), INVALID_ARGUMENT, ...
