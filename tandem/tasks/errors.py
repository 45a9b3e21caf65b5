"""Errors shared by task loaders."""


class DataError(ValueError):
    """A data file is missing, malformed, or too small; the message names the file and line."""
