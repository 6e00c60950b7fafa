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
