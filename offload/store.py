"""The on-disk store: ``manifest.json`` plus one safetensors file per unit.

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

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .errors import ChecksumError, StoreError, StoreMismatchError

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


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


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


def plan_layout(specs: Sequence[TensorSpec]) -> tuple[list[TensorRecord], int]:
    """Place tensors at 256-byte aligned offsets; return records and the padded data length.

    Larger element sizes go first and bigger tensors before smaller ones, so padding is rare.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise StoreError(f"duplicate tensor names in one unit: {sorted({n for n in names if names.count(n) > 1})}")
    order = sorted(specs, key=lambda s: (-s.dtype.itemsize, -s.nbytes, s.name))
    records, pos = [], 0
    for s in order:
        pos = _align(pos, TENSOR_ALIGN)
        records.append(TensorRecord(s.name, dtype_name(s.dtype), tuple(int(x) for x in s.shape), pos, s.nbytes))
        pos += s.nbytes
    return records, _align(max(pos, 1), PAGE)


def _header_bytes(records: Sequence[TensorRecord], data_bytes: int, metadata: dict[str, str]) -> bytes:
    """safetensors header with explicit padding tensors, padded so 8 + len(header) % 4096 == 0."""
    header: dict[str, Any] = {"__metadata__": metadata}
    pos, k = 0, 0
    for r in records:
        if r.offset > pos:
            header[f"{PAD_PREFIX}{k}__"] = {"dtype": "U8", "shape": [r.offset - pos], "data_offsets": [pos, r.offset]}
            k += 1
        header[r.name] = {"dtype": r.dtype, "shape": list(r.shape), "data_offsets": [r.offset, r.offset + r.nbytes]}
        pos = r.offset + r.nbytes
    if data_bytes > pos:
        header[f"{PAD_PREFIX}{k}__"] = {"dtype": "U8", "shape": [data_bytes - pos], "data_offsets": [pos, data_bytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * ((-(8 + len(raw))) % PAGE)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw bytes without a copy when it is already contiguous on the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def unit_file_name(index: int, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:120]
    return f"{index:05d}.{safe}.safetensors"


def _data_chunks(name: str, records: Sequence[TensorRecord], data_bytes: int, specs: Sequence[TensorSpec],
                 fetch: Callable[[str], torch.Tensor]) -> Iterator[tuple[memoryview | bytes, int]]:
    """The bytes of a unit's data section in file order: (chunk, tensor bytes it completes)."""
    spec_by_name = {s.name: s for s in specs}
    pos = 0
    for r in records:
        if r.offset > pos:
            yield bytes(r.offset - pos), 0
        t = fetch(r.name)
        spec = spec_by_name[r.name]
        if tuple(t.shape) != spec.shape:
            raise StoreError(f"tensor {name}.{r.name} has shape {tuple(t.shape)} in the source but "
                             f"{spec.shape} in the model: the checkpoint does not match the model")
        if t.dtype != spec.dtype:
            t = t.to(spec.dtype)
        mv = tensor_bytes(t)
        if len(mv) != r.nbytes:
            raise StoreError(f"tensor {name}.{r.name}: got {len(mv)} bytes, expected {r.nbytes}")
        yield mv, r.nbytes
        del t, mv
        pos = r.offset + r.nbytes
    if data_bytes > pos:
        yield bytes(data_bytes - pos), 0


try:  # hardware CRC-32C (SSE4.2 / ARMv8 CRC): ~2x zlib's CRC-32 here, GIL released on large buffers
    import crc32c as _crc32c
except ImportError:  # the store still has zlib's CRC-32 for every unit
    _crc32c = None


def crc32c_update(data: Any, value: int = 0) -> int:
    assert _crc32c is not None
    return int(_crc32c.crc32c(data, value))


def check_chunks(unit: UnitRecord, chunks: Iterable[Any]) -> tuple[bool, str]:
    """Do ``chunks`` (what the unit's reads brought in, in order) match the checksum recorded for it? The
    fastest recorded checksum this process can compute decides: CRC-32C when both sides have it, else
    zlib's CRC-32. One rule for the reader threads, ``info --verify`` and the resident file, so all
    report the same values."""
    fast = unit.crc32c is not None and _crc32c is not None
    got = 0
    for chunk in chunks:
        got = crc32c_update(chunk, got) if fast else zlib.crc32(chunk, got)
    if fast:
        return got == unit.crc32c, f"CRC-32C {got:08x}, the manifest recorded {unit.crc32c:08x}"
    return got == unit.crc32, f"CRC32 {got:08x}, the manifest recorded {unit.crc32:08x}"


def assemble(unit: UnitRecord, buf: torch.Tensor) -> None:
    """Copy the pieces of fused tensors into place, after a unit's reads (``TensorRecord.pieces``)."""
    for t in unit.tensors:
        at = t.offset
        for a, n in t.pieces:
            buf[at:at + n].copy_(buf[a:a + n])
            at += n


def unit_crc(name: str, specs: Sequence[TensorSpec], fetch: Callable[[str], torch.Tensor]) -> int:
    """The CRC32 ``write_unit_file`` would record for these tensors, without writing anything."""
    records, data_bytes = plan_layout(specs)
    crc = 0
    for chunk, _ in _data_chunks(name, records, data_bytes, specs, fetch):
        crc = zlib.crc32(chunk, crc)
    return crc


def write_unit_file(folder: str, file: str, name: str, specs: Sequence[TensorSpec],
                    fetch: Callable[[str], torch.Tensor], on_bytes: Callable[[int], None] | None = None) -> UnitRecord:
    """Stream one unit's tensors into ``folder/file`` atomically; peak memory is one tensor.

    ``fetch(name)`` returns one tensor at a time, so a source backed by memory maps (Accelerate's
    ``.dat`` files, safetensors shards) never has more than one tensor materialised.
    """
    records, data_bytes = plan_layout(specs)
    header = _header_bytes(records, data_bytes, {"format": "pt", "offload_unit": name})
    data_offset = 8 + len(header)
    final = os.path.join(folder, file)
    tmp = os.path.join(folder, f".{file}.tmp-{os.getpid()}")
    crc = 0
    crc_c = 0
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for chunk, done in _data_chunks(name, records, data_bytes, specs, fetch):
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
                crc_c = crc32c_update(chunk, crc_c) if _crc32c is not None else 0
                if on_bytes and done:
                    on_bytes(done)
            f.flush()
            os.fsync(f.fileno())
            # The writer's pages are not worth caching: the reader uses O_DIRECT.
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return UnitRecord(name, file, data_offset + data_bytes, data_offset, data_bytes, crc, tuple(records),
                      crc_c if _crc32c is not None else None)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(folder: str, units: Sequence[UnitRecord], source: dict[str, Any],
                   resident: UnitRecord | None = None, extra: dict[str, Any] | None = None) -> None:
    doc = {"format": FORMAT, "version": VERSION, "source": source,
           "units": [u.to_json() for u in units], "resident": resident.to_json() if resident else None}
    if extra:
        doc.update(extra)
    tmp = os.path.join(folder, f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))
    _fsync_dir(folder)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, IN_PROGRESS))


def header_sha256(path: str) -> str:
    """SHA-256 of a safetensors file's header bytes (its 8-byte length and JSON): names, dtypes, shapes
    and offsets of every tensor, read without touching the data, so rechecking a 300 GB checkpoint is cheap."""
    size, body = _header_bytes_of(path, "the file is truncated or is not safetensors")
    return hashlib.sha256(size + body).hexdigest()


def file_provenance(path: str) -> dict[str, Any]:
    """One source file as a store's manifest records it (``source.files``): name, size, mtime_ns and,
    for safetensors, ``header_sha256``. A cached store is reused only while these still match."""
    st = os.stat(path)
    entry: dict[str, Any] = {"name": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.endswith(".safetensors"):
        entry["header_sha256"] = header_sha256(path)
    return entry


def main_float_dtype(tensors: Iterable[tuple[torch.dtype, int]]) -> torch.dtype | None:
    """The floating dtype holding the most bytes among ``(dtype, nbytes)`` pairs (None without floats)."""
    by: dict[torch.dtype, int] = {}
    for dtype, nbytes in tensors:
        if dtype.is_floating_point:
            by[dtype] = by.get(dtype, 0) + nbytes
    return max(by, key=lambda d: by[d]) if by else None


def fingerprint(items: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# Reading and validating


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


def _safe_path(folder: str, rel: str, unit: str) -> str:
    """Resolve a manifest file name and refuse anything that leaves the store folder."""
    if (not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or "\\" in rel
            or any(p in ("..", "") for p in rel.split("/"))):
        raise StoreError(f"{os.path.join(folder, MANIFEST)}: unit {unit} names file {rel!r} outside the store "
                         f"folder; refusing to read it (the manifest is damaged or hostile)")
    path = os.path.join(folder, rel)
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([os.path.realpath(path), real_folder]) != real_folder:
        raise StoreError(f"{path}: unit {unit}'s file is a link that leaves the store folder {folder}; refusing to read it")
    return path


def _header_bytes_of(path: str, fix: str) -> tuple[bytes, bytes]:
    """A safetensors file's 8-byte header length and header, without trusting the declared size."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise StoreError(f"{path}: file is {len(raw)} bytes, too short for a safetensors header: {fix}")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise StoreError(f"{path}: safetensors header declares {n} bytes but the file has {size}: {fix}")
        return raw, f.read(n)


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without trusting its declared size."""
    _, body = _header_bytes_of(path, "the file is truncated or corrupted; re-run `offload convert`")
    n = len(body)
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StoreError(f"{path}: safetensors header is not valid JSON ({e}): re-run `offload convert`") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: safetensors header is not a JSON object: re-run `offload convert`")
    return header, 8 + n


class Store:
    """A validated store folder. Opening it checks everything that does not require reading the data."""

    def __init__(self, path: str, manifest: dict[str, Any], units: list[UnitRecord], resident: UnitRecord | None):
        self.path = path
        self.manifest = manifest
        self.units = units
        self.resident = resident
        self.by_name = {u.name: u for u in units}
        # Checksums of units read in place, recorded on their first full read (the source has none):
        # name -> (crc32, crc32c). Loaded from CHECKSUMS; new ones are saved by ``save_checksums``.
        self.recorded: dict[str, tuple[int, int | None]] = {}
        self._new_checksums = False

    @property
    def root(self) -> str:
        """Where extents' files are: the checkpoint folder of a store read in place, else the store itself."""
        root = self.manifest.get("root")
        return root if isinstance(root, str) and root else self.path

    def path_of(self, unit: UnitRecord, file: str) -> str:
        """A file a unit reads, refused if it leaves the store (or, read in place, the checkpoint) folder."""
        return _safe_path(self.root if unit.extents else self.path, file, unit.name)

    @staticmethod
    def _checksum_key(unit: UnitRecord) -> str:
        """What a recorded checksum belongs to: the unit's name *and* the bytes it reads (a block read
        without its routed experts is another read than the whole block, under the same name)."""
        where = hashlib.sha256(json.dumps([dataclasses.astuple(e) for e in unit.reads]).encode()).hexdigest()[:16]
        return f"{unit.name}@{where}"

    def checksum_of(self, unit: UnitRecord) -> UnitRecord:
        """``unit`` with the checksum recorded for it (a unit read in place has one after its first read)."""
        key = self._checksum_key(unit)
        if unit.crc32 is None and key in self.recorded:
            crc, crcc = self.recorded[key]
            return dataclasses.replace(unit, crc32=crc, crc32c=crcc)
        return unit

    def record_checksum(self, unit: UnitRecord, chunks: Sequence[Any]) -> None:
        """First full read of a unit read in place: its checksum, checked on later first reads."""
        crc = 0
        crcc = 0 if _crc32c is not None else None
        for c in chunks:
            crc = zlib.crc32(c, crc)
            if crcc is not None:
                crcc = crc32c_update(c, crcc)
        self.recorded[self._checksum_key(unit)] = (crc, crcc)
        self._new_checksums = True

    def save_checksums(self) -> None:
        """Merge the checksums recorded in this process into CHECKSUMS (atomic; a later process checks them)."""
        if not self._new_checksums:
            return
        path = os.path.join(self.path, CHECKSUMS)
        try:
            with open(path) as f:
                have = {k: tuple(v) for k, v in json.load(f).get("units", {}).items()}
        except (OSError, ValueError, AttributeError):
            have = {}
        have.update(self.recorded)
        tmp = f"{path}.tmp-{os.getpid()}"
        with contextlib.suppress(OSError):  # a read-only index still runs; it just records nothing
            with open(tmp, "w") as f:
                json.dump({"fingerprint": self.source.get("fingerprint"), "units": have}, f)
            os.replace(tmp, path)
            self._new_checksums = False

    def _load_checksums(self) -> None:
        try:
            with open(os.path.join(self.path, CHECKSUMS)) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(doc, dict) and doc.get("fingerprint") == self.source.get("fingerprint"):
            with contextlib.suppress(TypeError, ValueError):
                self.recorded = {str(k): (int(v[0]), int(v[1]) if v[1] is not None else None)
                                 for k, v in doc.get("units", {}).items()}

    def read_unit(self, unit: UnitRecord) -> torch.Tensor:
        """A unit's whole buffer, read with plain buffered reads and assembled (enable-time and off-path
        uses: the resident part, restoring weights on ``disable``, drafts; streaming goes through the
        prefetcher's readers)."""
        out = torch.empty(unit.data_bytes, dtype=torch.uint8)
        buf = memoryview(out.numpy())
        for e in unit.reads:
            path = self.path_of(unit, e.file)
            with open(path, "rb") as f:
                f.seek(e.offset)
                got = f.readinto(buf[e.into:e.into + e.length]) if e.length else 0
            if got != e.length:
                raise StoreError(f"{path} (unit {unit.name}) ended early: {got} of {e.length} bytes at offset "
                                 f"{e.offset}: the file changed; re-run `offload convert` (a cached store: --rebuild)")
        assemble(unit, out)
        return out

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest.get("source") or {}

    @property
    def quantization(self) -> dict[str, Any] | None:
        """How quantized units are stored (``{"scheme": "int8"|"int4", "group_size": ..., "int4_layout": ...}``),
        or None for a store of plain tensors."""
        q = self.manifest.get("quantization")
        return q if isinstance(q, dict) and q.get("scheme") else None

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype the store holds: ``source.dtype`` in the manifest (``"bfloat16"``), else, for a
        store written before it was recorded, the floating dtype of most of its bytes."""
        name = self.source.get("dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        units = self.units + ([self.resident] if self.resident else [])
        return main_float_dtype((t.torch_dtype, t.nbytes) for u in units for t in u.tensors)

    def file_path(self, unit: UnitRecord) -> str:
        return os.path.join(self.path, unit.file)

    @classmethod
    def open(cls, path: str | os.PathLike[str], check_files: bool = True) -> Store:
        path = os.fspath(path)
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise StoreError(f"{path} is not a folder: pass a store created by `offload convert` or `offload.enable(store=...)`")
        if not os.path.exists(mpath):
            hint = (" (a conversion into it was interrupted: re-run it to finish)"
                    if os.path.exists(os.path.join(path, IN_PROGRESS)) else "")
            raise StoreError(f"{mpath} is missing, so {path} is not a store{hint}: create one with `offload convert`")
        try:
            with open(mpath, "rb") as f:
                raw = f.read(MAX_HEADER_BYTES + 1)
            if len(raw) > MAX_HEADER_BYTES:
                raise StoreError(f"{mpath} is larger than {MAX_HEADER_BYTES} bytes; refusing to parse it")
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise StoreError(f"{mpath} is not valid JSON ({e}): re-run `offload convert`") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath} is not an offload store manifest: re-run `offload convert`")
        version = manifest.get("version")
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise StoreError(f"{mpath} has format version {version!r}; this offload reads version {VERSION}: "
                             f"upgrade offload or re-run `offload convert` with this version")
        raw_units = manifest.get("units")
        if not isinstance(raw_units, list):
            raise StoreError(f"{mpath}: 'units' must be a list: re-run `offload convert`")
        units = [_parse_unit(u, mpath) for u in raw_units]
        names = [u.name for u in units]
        if len(set(names)) != len(names):
            raise StoreError(f"{mpath}: unit names repeat: re-run `offload convert`")
        resident = _parse_unit(manifest["resident"], mpath) if manifest.get("resident") else None
        if not all(isinstance(d, dict) for d in raw_units):
            raise StoreError(f"{mpath}: every unit entry must be an object: re-run `offload convert`")
        store = cls(path, manifest, units, resident)
        for u in units + ([resident] if resident else []):
            for e in u.reads:
                store.path_of(u, e.file)
        store._load_checksums()
        if check_files:
            for u in units + ([resident] if resident else []):
                store.check_file(u)
        return store

    def check_file(self, unit: UnitRecord) -> None:
        """Size and header checks: cheap, and they catch truncation, extension and a swapped file."""
        if unit.extents:  # read in place: the checkpoint's provenance (size, mtime, header hash) is checked
            for e in unit.extents:  # where the index is made and reused; here, that every read is there
                path = self.path_of(unit, e.file)
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    raise StoreError(f"{path} (unit {unit.name}, read in place) is missing: restore it, or "
                                     f"rebuild the store (--rebuild)") from None
                if size < e.offset + e.length:
                    raise StoreError(f"{path} (unit {unit.name}, read in place) is {size} bytes, shorter than the "
                                     f"{e.offset + e.length} the store reads: it changed; rebuild the store (--rebuild)")
            return
        path = _safe_path(self.path, unit.file, unit.name)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise StoreError(f"layer file {path} (unit {unit.name}) is missing: re-run `offload convert`") from None
        if size != unit.file_bytes:
            diff = unit.file_bytes - size
            word = "shorter" if diff > 0 else "longer"
            raise StoreError(f"layer file {path} (unit {unit.name}) is {abs(diff)} bytes {word} than the manifest "
                             f"says ({size} vs {unit.file_bytes}): re-run `offload convert`")
        header, data_offset = read_safetensors_header(path)
        if data_offset != unit.data_offset:
            raise StoreError(f"layer file {path} (unit {unit.name}): data starts at {data_offset}, manifest says "
                             f"{unit.data_offset}: re-run `offload convert`")
        for t in unit.tensors:
            h = header.get(t.name)
            if (not isinstance(h, dict) or h.get("dtype") != t.dtype or h.get("shape") != list(t.shape)
                    or h.get("data_offsets") != [t.offset, t.offset + t.nbytes]):
                raise StoreError(f"layer file {path} (unit {unit.name}): header entry for {t.name} differs from "
                                 f"the manifest: re-run `offload convert`")

    def check_side_files(self) -> None:
        """The config and tokenizer files are what the store was written with (SHA-256 in the manifest's
        ``side_files``): the model is built from them, so an edit changes outputs as a damaged weight would."""
        for name, want in (self.manifest.get("side_files") or {}).items():
            path = _safe_path(self.path, name, name)
            try:
                with open(path, "rb") as f:
                    got = hashlib.sha256(f.read()).hexdigest()
            except FileNotFoundError:
                raise StoreError(f"{path} is missing from the store (the manifest lists it): restore it or re-run "
                                 f"`offload convert` (a cached store: --rebuild)") from None
            if got != want:
                raise ChecksumError(f"{path} changed after the store was written (sha256 {got[:12]}, the manifest "
                                    f"recorded {want[:12]}): restore it, re-run `offload convert` (a cached store: "
                                    f"--rebuild), or edit the checkpoint folder's own copy instead")

    def read_tensor(self, unit: UnitRecord, name: str) -> torch.Tensor:
        """One tensor of a unit, in fresh memory (for a use outside the unit's forward; see hooks.Offloaded)."""
        t = next(t for t in unit.tensors if t.name == name)
        if unit.extents:  # read in place: the unit's reads hold it (rare, off the hot path)
            return self.read_unit(unit)[t.offset:t.offset + t.nbytes].clone().view(t.torch_dtype).view(t.shape)
        path = _safe_path(self.path, unit.file, unit.name)
        out = torch.empty(t.nbytes, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(unit.data_offset + t.offset)
            got = f.readinto(memoryview(out.numpy())) if t.nbytes else 0
        if got != t.nbytes:
            raise StoreError(f"layer file {path} (unit {unit.name}) ended early reading {name}: re-run `offload convert`")
        return out.view(t.torch_dtype).view(t.shape)

    def read_verified(self, unit: UnitRecord, evict: bool = False) -> torch.Tensor:
        """``read_unit``, checked against the unit's checksum (recorded now if it is read in place for the
        first time); ``evict`` drops what it read from the page cache (a later cold pass must not find it)."""
        data = self.read_unit(unit)
        unit = self.checksum_of(unit)
        chunks = [memoryview(data.numpy())[e.into:e.into + e.length] for e in unit.reads]
        if evict:
            for e in unit.reads:
                with contextlib.suppress(OSError, AttributeError):
                    fd = os.open(self.path_of(unit, e.file), os.O_RDONLY)
                    os.posix_fadvise(fd, e.offset, e.length, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
        if unit.crc32 is None:
            self.record_checksum(unit, chunks)
            return data
        ok, detail = check_chunks(unit, chunks)
        if not ok:
            where = self.root if unit.extents else self.path_of(unit, unit.file)
            raise ChecksumError(f"{where}: unit {unit.name} fails its checksum ({detail}): the data is corrupted "
                                f"or the source changed; re-run `offload convert` (a cached store: --rebuild)")
        return data

    def verify_unit(self, unit: UnitRecord, evict: bool = True) -> None:
        """Re-read a unit and compare its checksum with the recorded one (``info --verify``, the resident
        file on ``load``)."""
        if unit.extents:
            self.read_verified(unit, evict)
            return
        self._verify_file(unit, evict)

    def _verify_file(self, unit: UnitRecord, evict: bool = True) -> None:
        """Re-read the data section and compare its checksum with the manifest's (``check_chunks``).
        ``evict`` drops the file from the page cache afterwards (a check of the whole store should not
        leave it warm; the resident file, loaded right after, keeps its pages)."""
        path = _safe_path(self.path, unit.file, unit.name)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                f.seek(unit.data_offset)
                left = unit.data_bytes
                while left:
                    chunk = f.read(min(left, 16 << 20))
                    if not chunk:
                        raise StoreError(f"layer file {path} (unit {unit.name}) ended early: re-run `offload convert`")
                    yield chunk
                    left -= len(chunk)
        ok, detail = check_chunks(unit, chunks())
        if evict:
            with contextlib.suppress(OSError, AttributeError):
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        if not ok:
            from ._cache import damaged_fix
            raise ChecksumError(f"layer file {path} (unit {unit.name}) fails its checksum ({detail}): the data is "
                                f"corrupted; {damaged_fix(self.path)}")

    def match(self, expected: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]) -> None:
        """Check the store holds exactly the units and tensors a model needs; name the first difference."""
        have = {u.name: u for u in self.units}
        missing = [n for n in expected if n not in have]
        extra = [n for n in have if n not in expected]
        if missing or extra:
            raise StoreMismatchError(
                f"store {self.path} does not match the model: units missing from the store {missing[:5]}, units the "
                f"model does not have {extra[:5]}. Use another store folder or delete this one to rebuild it")
        for name, tensors in expected.items():
            u = have[name]
            got = {t.name: (t.torch_dtype, t.shape) for t in u.tensors}
            if set(got) != set(tensors):
                raise StoreMismatchError(
                    f"store {self.path}, unit {name}: tensors differ (only in store: {sorted(set(got) - set(tensors))[:5]}, "
                    f"only in model: {sorted(set(tensors) - set(got))[:5]}). Use another store folder or delete this one")
            for tname, (dtype, shape) in tensors.items():
                if got[tname] != (dtype, tuple(shape)):
                    raise StoreMismatchError(
                        f"store {self.path}, unit {name}, tensor {tname}: store has {got[tname][0]} {list(got[tname][1])}, "
                        f"model has {dtype} {list(shape)}. Use another store folder or delete this one")
