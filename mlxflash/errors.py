"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class MlxflashError(Exception):
    """Base class: the message names the problem (file, field, expected vs found)."""


class BundleError(MlxflashError):
    """A flash bundle is missing, truncated, corrupt or of an unknown version."""


class ConvertError(MlxflashError):
    """A source checkpoint cannot be converted into a flash bundle."""


class UsageError(MlxflashError):
    """The request itself is invalid (prompt too long, bad option value)."""


class FetchError(MlxflashError):
    """A model cannot be fetched: download failed, a checksum does not match, the hub is unreachable."""
