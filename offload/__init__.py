"""offload: run models bigger than memory by streaming their blocks from disk, prefetched.

    import offload
    handle = offload.enable(model, prefetch=2)   # Accelerate-dispatched or plain nn.Module
    handle.stats()                               # bytes read, stall time, misses
    offload.disable(model)                       # or: with offload.enable(...):
    offload.convert("hf-folder/", "store/")      # checkpoint → store
    model, handle = offload.load("store/")       # a model bigger than RAM: built on meta, blocks streamed
"""
from .convert import convert
from .errors import (CheckpointError, ChecksumError, OffloadError, StoreError, StoreMismatchError,
                     UnitReadError)
from . import speculate  # noqa: F401  (offload.speculate.generate: several tokens per streamed pass)
from .handle import Handle, Stats, disable
from .runtime import enable, load

__version__ = "0.1.0"
__all__ = ["enable", "disable", "load", "convert", "speculate", "Handle", "Stats", "OffloadError", "StoreError", "ChecksumError",
           "StoreMismatchError", "UnitReadError", "CheckpointError", "__version__"]
