"""Exception types. Every message names the file or unit involved and what to do about it."""
from __future__ import annotations


class OffloadError(Exception):
    """Base class for every error this package raises on purpose."""


class StoreError(OffloadError):
    """A store folder is missing, incomplete, damaged or unsafe to read."""


class ChecksumError(StoreError):
    """A unit file's bytes do not match the checksum recorded when it was written."""


class StoreMismatchError(StoreError):
    """A store is intact but holds different tensors than the model being enabled."""


class UnitReadError(OffloadError):
    """Reading a unit's weights failed at run time (I/O error, file removed or truncated after enable)."""


class CheckpointError(OffloadError):
    """A source checkpoint cannot be converted (unknown layout, pickle refused, missing shards)."""
