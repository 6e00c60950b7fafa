"""Errors that carry a message meant for the user, not a traceback."""


class MtpdistError(Exception):
    """Base class: the CLI prints the message and exits non-zero."""


class ModelLoadError(MtpdistError):
    """A checkpoint cannot be loaded as asked (missing files, wrong shapes, no MTP head)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture is not one mtpdist runs."""
