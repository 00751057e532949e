"""Writing a store's files: a unit's safetensors file laid out for O_DIRECT, and the manifest, atomically.

One concept: the bytes of a store as they go to disk. Tensors are placed at 256-byte aligned offsets
behind a header padded to a page (``plan_layout``), streamed one tensor at a time with their
checksums (``write_unit_file``), under a temporary name, fsync'd and renamed; the manifest is
written last (``write_manifest``). What to write, and resuming an interrupted write, is ``convert``'s.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .errors import StoreError
from .integrity import _crc32c, crc32c_update
from .manifest import (FORMAT, IN_PROGRESS, MANIFEST, PAD_PREFIX, PAGE, TENSOR_ALIGN, VERSION, TensorRecord, TensorSpec,
                       UnitRecord, dtype_name)

def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


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
