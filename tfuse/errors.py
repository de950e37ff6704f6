"""Errors that the CLI reports as one clear message (no traceback) and a non-zero exit."""


class TfuseError(Exception):
    """A user-facing error: the message names the file, key or layer and says how to fix it."""
