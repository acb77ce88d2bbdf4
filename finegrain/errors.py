"""Errors that are the user's to fix: the CLI prints them as one clear message, no traceback."""


class FinegrainError(Exception):
    """Base class for problems with the user's input (files, options, manifests)."""


class ManifestError(FinegrainError):
    """A manifest (or the dataset files it was imported from) is malformed."""


class BadImageError(FinegrainError):
    """An image file is missing, does not decode, or is unusable (too small, too large).

    Attributes:
        path: the file that failed.
        reason: a short human-readable reason, e.g. "truncated JPEG".
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
