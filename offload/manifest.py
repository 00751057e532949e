"""The store format: what ``manifest.json`` records about each unit, and the check of one unit entry.

One concept: the records (``UnitRecord``, ``TensorRecord``, ``Extent``, ``QuantRecord``, ``TensorSpec``)
and the names and constants of the format, shared by the reader (``store``), the writer (``writer``)
and the planners (``ranges``, ``convert``), none of which has to import another for them.

Format (version 1)
------------------
* ``manifest.json`` — ``{"format": "offload-store", "version": 1, "source": {...}, "units": [...],
  "resident": {...} | null}``. ``source`` says where the store came from: ``kind``, ``path``, a
  ``fingerprint``, ``files`` (each source file's ``name``, ``size``, ``mtime_ns`` and, for
  safetensors, ``header_sha256`` of its header bytes), the ``dtype`` the store holds (torch's name,
  e.g. ``"bfloat16"``) and ``quantization`` (``null``: none). Beside it, the checkpoint's
  ``config.json``, ``generation_config.json`` and tokenizer files, so a store is a checkpoint. Each
  unit records its file, the file's byte size, where the data section starts, its length, a CRC32
  of the data section and the tensor table (name, dtype, shape, offset into the data section, byte size).
* Each unit file is a standard safetensors file. Its JSON header is padded with spaces so the data
  section starts at a multiple of 4096 bytes (O_DIRECT needs aligned offsets), tensors are placed at
  256-byte aligned offsets (fast kernels, element-aligned views), and the data section is padded to a
  multiple of 4096 bytes so a whole unit is one aligned read. safetensors forbids holes between
  tensors, so padding is stored as ``U8`` tensors named ``__offload_pad_<k>__``.
* Files are written under a temporary name, fsync'd and renamed; the manifest is written last. A
  folder without a valid manifest is not a store.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from .errors import StoreError

FORMAT = "offload-store"
VERSION = 1
MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"  # a store read in place: checksums recorded on first reads
IN_PROGRESS = ".offload-store-in-progress"
PAGE = 4096
TENSOR_ALIGN = 256
PAD_PREFIX = "__offload_pad_"
# A declared header larger than this is rejected before it is read (a giant size is an attack, not a model).
MAX_HEADER_BYTES = 64 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES["F8_E4M3" if "e4m3" in _name else "F8_E5M2"] = getattr(torch, _name)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise StoreError(f"dtype {dtype} cannot be stored: supported are {sorted(DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    name: str  # relative to the unit, e.g. "self_attention.dense.weight"
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int  # into the unit's data section (its buffer)
    nbytes: int
    # Set for a tensor assembled from several source tensors (per-expert weights fused into one 3-D
    # tensor): buffer (offset, nbytes) pieces, copied in order to ``offset`` after the unit's reads.
    pieces: tuple[tuple[int, int], ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Extent:
    """One read of a unit: ``length`` bytes at ``offset`` of ``file`` into the unit's buffer at ``into``.

    A store's own unit is one extent, its data section. A unit read in place from a checkpoint is the
    byte ranges of its tensors in the source shards, coalesced and widened to the O_DIRECT alignment
    (``ranges.plan_extents``); ``file`` is then relative to the manifest's ``root`` (the checkpoint).
    """
    file: str
    offset: int
    length: int
    into: int


@dataclasses.dataclass(frozen=True)
class QuantRecord:
    """A weight stored quantized: its stored parts are tensors named ``<name>.<part>`` (``offload.quant``)."""
    name: str  # the original parameter, relative to the unit, e.g. "mlp.dense_h_to_4h.weight"
    dtype: str  # its float dtype (safetensors name): what it computes in
    shape: tuple[int, ...]  # its shape as the module holds it
    transposed: bool = False  # stored [in, out] (transformers' Conv1D)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class UnitRecord:
    name: str
    file: str  # relative to the store folder
    file_bytes: int
    data_offset: int
    data_bytes: int
    crc32: int | None  # None: read in place and never read yet (recorded on its first read: CHECKSUMS)
    tensors: tuple[TensorRecord, ...]
    crc32c: int | None = None  # CRC-32C of the data section (hardware-accelerated; checked on first read)
    quantized: tuple[QuantRecord, ...] = ()  # weights stored quantized (manifest "quantization" says how)
    extents: tuple[Extent, ...] = ()  # read in place: where the bytes are (empty: the data section of file)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tensors"] = [{k: v for k, v in dict(dataclasses.asdict(t), shape=list(t.shape),
                                                 pieces=[list(p) for p in t.pieces]).items() if v != [] or k == "shape"}
                        for t in self.tensors]
        d["quantized"] = [dict(dataclasses.asdict(q), shape=list(q.shape)) for q in self.quantized]
        if not self.extents:
            del d["extents"]
        return d

    @property
    def reads(self) -> tuple[Extent, ...]:
        """What to read, where to: the extents, or the one data section of a store's own file."""
        return self.extents or (Extent(self.file, self.data_offset, self.data_bytes, 0),)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of real tensor data (the data section minus alignment padding)."""
        return sum(t.nbytes for t in self.tensors)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What the writer needs to know about a tensor before its bytes exist."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def main_float_dtype(tensors: Iterable[tuple[torch.dtype, int]]) -> torch.dtype | None:
    """The floating dtype holding the most bytes among ``(dtype, nbytes)`` pairs (None without floats)."""
    by: dict[torch.dtype, int] = {}
    for dtype, nbytes in tensors:
        if dtype.is_floating_point:
            by[dtype] = by.get(dtype, 0) + nbytes
    return max(by, key=lambda d: by[d]) if by else None


def _parse_unit(d: Any, where: str) -> UnitRecord:
    try:
        tensors = tuple(
            TensorRecord(str(t["name"]), str(t["dtype"]), tuple(int(x) for x in t["shape"]), int(t["offset"]), int(t["nbytes"]),
                         tuple((int(a), int(b)) for a, b in t.get("pieces") or ()))
            for t in d["tensors"])
        extents = tuple(Extent(str(e["file"]), int(e["offset"]), int(e["length"]), int(e["into"]))
                        for e in d.get("extents") or ())
        rec = UnitRecord(str(d["name"]), str(d["file"]), int(d["file_bytes"]), int(d["data_offset"]),
                         int(d["data_bytes"]), int(d["crc32"]) if d.get("crc32") is not None else None,  # type: ignore[arg-type]
                         tensors, int(d["crc32c"]) if d.get("crc32c") is not None else None,
                         tuple(QuantRecord(str(q["name"]), str(q["dtype"]), tuple(int(x) for x in q["shape"]),
                                           bool(q.get("transposed", False))) for q in d.get("quantized") or ()),
                         extents)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise StoreError(f"{where}: malformed unit entry ({type(e).__name__}: {e}): re-run `offload convert`") from None
    for t in rec.tensors:
        if t.dtype not in DTYPES:
            raise StoreError(f"{where}: unit {rec.name} tensor {t.name} has unknown dtype {t.dtype!r}")
        if any(s < 0 for s in t.shape) or t.offset < 0 or t.nbytes < 0:
            raise StoreError(f"{where}: unit {rec.name} tensor {t.name} has a negative shape, offset or size")
        n = 1
        for s in t.shape:
            n *= s
        if n * t.torch_dtype.itemsize != t.nbytes:
            raise StoreError(f"{where}: unit {rec.name} tensor {t.name}: shape {t.shape} does not match {t.nbytes} bytes")
        if t.offset + t.nbytes > rec.data_bytes or any(a < 0 or b < 0 or a + b > rec.data_bytes for a, b in t.pieces):
            raise StoreError(f"{where}: unit {rec.name} tensor {t.name} lies outside the unit's data section")
        if t.pieces and sum(b for _, b in t.pieces) != t.nbytes:
            raise StoreError(f"{where}: unit {rec.name} tensor {t.name}: its pieces do not add up to its size")
    names = {t.name for t in rec.tensors}
    for q in rec.quantized:
        if q.dtype not in DTYPES or not any(n.startswith(q.name + ".") for n in names):
            raise StoreError(f"{where}: unit {rec.name}: quantized weight {q.name} has no stored parts or an unknown "
                             f"dtype {q.dtype!r}: re-run `offload convert`")
    for e in rec.extents:
        if e.offset < 0 or e.length < 0 or e.into < 0 or e.into + e.length > rec.data_bytes:
            raise StoreError(f"{where}: unit {rec.name} has an extent outside its buffer: re-run `offload convert`")
    if rec.extents:
        if rec.crc32 is None and rec.crc32c is not None:
            raise StoreError(f"{where}: unit {rec.name} has a CRC-32C without a CRC-32: re-run `offload convert`")
        return rec
    if rec.crc32 is None:
        raise StoreError(f"{where}: unit {rec.name} has no checksum: re-run `offload convert`")
    if rec.data_offset < 8 or rec.data_bytes < 0 or rec.file_bytes != rec.data_offset + rec.data_bytes:
        raise StoreError(f"{where}: unit {rec.name} has inconsistent sizes (file {rec.file_bytes}, "
                         f"data {rec.data_offset}+{rec.data_bytes}): re-run `offload convert`")
    return rec
