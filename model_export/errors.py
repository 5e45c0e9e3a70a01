"""Errors of the model bundle contract, so callers (CLI, workers) can tell *why* a bundle is refused."""

from __future__ import annotations


class BundleError(Exception):
    """A model bundle cannot be used: missing or unreadable files, a bad manifest, a bad input."""


class BundleIntegrityError(BundleError):
    """A bundle's bytes differ from what its manifest records (corruption, a partial copy, tampering).

    ``path`` is the offending file, so an operator knows which one to replace.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class BundleMismatchError(BundleError):
    """An intact bundle that does not fit where it is used (embedding dimension, recipe version, runtime)."""


class BundleInputError(BundleError, ValueError):
    """An input handed to the runtime has the wrong shape, dtype or content."""


class ParityError(BundleError):
    """The exported ONNX graphs do not reproduce the PyTorch model closely enough."""
