"""Trusting bytes on disk: checksums of a unit's data, safetensors headers, the provenance of source files.

One concept: what offload checks before it believes a file. A unit's bytes against the CRC-32C / CRC-32
its manifest recorded (``check_chunks``, one rule for the reader threads, ``info --verify`` and the
resident file), a safetensors header parsed without trusting its declared size, and the name, size,
mtime and header hash of each checkpoint file a store was made from (``file_provenance``,
``fingerprint``), which decide whether a cached store is still current; and, when a check fails, what
to do about it (``damaged_fix``: rebuild a cached store, convert a user's own again).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import struct
import zlib
from collections.abc import Iterable
from typing import Any

from .config import cache_dir
from .errors import StoreError
from .manifest import MANIFEST, MAX_HEADER_BYTES, UnitRecord

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


def fingerprint(items: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(repr(item).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


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


def damaged_fix(store_path: str) -> str:
    """What to do about a damaged store at ``store_path``: a cached store is rebuilt from its checkpoint
    folder (``--rebuild`` / ``rebuild=True``); a store of the user's own is converted again."""
    root = os.path.realpath(cache_dir())
    if os.path.dirname(os.path.realpath(store_path)) != os.path.join(root, "stores"):
        return "re-run `offload convert` (or restore the file)"
    folder, flags, kwargs = "", "", ""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(store_path, MANIFEST)) as f:
            manifest = json.load(f)
        folder = str(manifest.get("source", {}).get("path") or "")
        dtype, q = manifest.get("source", {}).get("dtype"), manifest.get("quantization")
        if manifest.get("source", {}).get("layout") != "in-place" and dtype:  # a copy: name the one to rebuild
            tag = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)  # --dtype's spelling
            flags, kwargs = f" --dtype {tag}", f", dtype={dtype!r}"
        if isinstance(q, dict) and q.get("scheme"):
            flags, kwargs = flags + f" --quantize {q['scheme']}", kwargs + f", quantize={q['scheme']!r}"
    if not folder:
        return f"it is a cached store: remove it (`offload cache clean --all`, or delete {store_path})"
    random = os.path.join(root, "random")
    if os.path.dirname(os.path.realpath(folder)) == random:  # the CLI's --random NAME (folder NAME-DTYPE)
        name = os.path.basename(folder).rsplit("-", 1)[0]
        cli = f"offload run --random {name}{flags} --rebuild"
    else:
        cli = f"offload run {shlex.quote(folder)}{flags} --rebuild"
    return (f"it is the cached store of {folder}: rebuild it with `{cli}` (Python: offload.load({folder!r}{kwargs}, "
            f"rebuild=True))")
