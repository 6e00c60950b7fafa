"""Errors that carry a message meant for the user, not a traceback.

Domain kinds, not transport codes: a worker raises `RequestError(kind, ...)`, and only
`wire/` maps kinds to and from gRPC status codes.
"""

# What a worker can say about a request it will not run.
KINDS = (
    "invalid",      # malformed or over the limits: the same request fails again
    "denied",       # a route or caller the plan does not allow
    "state_lost",   # the sequence, kept prefix or shard is gone (restarted, evicted, expired): replay
    "conflict",     # the cache is not where the caller says: a caller's bug, reported once
    "exists",       # the sequence id is taken
    "data_loss",    # bytes that fail their content hash
    "exhausted",    # not enough memory for the request
    "internal",     # the worker failed computing it
)


class MtpdistError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""


class ModelLoadError(MtpdistError):
    """A checkpoint cannot be loaded as asked (missing files, wrong shapes, no MTP head)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one mtpdist runs."""


class RequestError(MtpdistError):
    """A request that cannot be served; `kind` (one of KINDS) says why."""

    def __init__(self, kind: str, message: str):
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind = kind


class WorkerCallError(MtpdistError):
    """A call to a worker failed; says which worker and why. `kind` is "lost" (no answer: the
    worker or its link is gone or hung) or one of KINDS; `code` is the transport's own name."""

    def __init__(self, address: str, kind: str, code: str, message: str):
        super().__init__(f"worker {address}: {code}: {message}")
        self.address, self.kind, self.code, self.details = address, kind, code, message

    @property
    def recoverable(self) -> bool:
        """A lost worker or lost state: re-plan and replay. Anything else would fail the same way
        again after any number of re-plans, and is reported once."""
        return self.kind in ("lost", "state_lost")


def is_recoverable(err: BaseException) -> bool:
    """Whether a failed unit is worth a re-plan and an exact replay."""
    return isinstance(err, WorkerCallError) and err.recoverable
