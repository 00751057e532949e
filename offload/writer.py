"""Writing a store: its unit files laid out for O_DIRECT, its manifest, and a whole store, resumably.

One concept: the bytes of a store as they go to disk. Tensors are placed at 256-byte aligned offsets
behind a header padded to a page (``plan_layout``) and streamed one tensor at a time with their
checksums (``write_unit_file``); ``write_store`` writes the units that ``UnitSource``s describe, the
config and tokenizer files, and the manifest, last. What to write is ``convert``'s and ``sources``'.

Crash safety: a marker file says a conversion is in progress and records each finished unit; unit
files appear only under their final name once complete (``os.replace``); the manifest is written
last. Re-running the same conversion resumes; a folder that is neither empty, a store, nor one of
our in-progress conversions is refused, so nothing a user owns is overwritten.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from ._memory import ensure_free_space
from .errors import OffloadError, StoreError
from .integrity import _crc32c, crc32c_update
from .manifest import (FORMAT, IN_PROGRESS, MANIFEST, PAD_PREFIX, PAGE, TENSOR_ALIGN, VERSION, QuantRecord, TensorRecord,
                       TensorSpec, UnitRecord, _parse_unit, dtype_name)
from .store import Store

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


# ------------------------------------------------------------------------------ a whole store


Fetch = Callable[[str], torch.Tensor]


class UnitSource:
    """What the writer needs for one unit: its name, tensor specs, and a way to fetch each tensor.

    ``open()`` returns the fetch function and is a context, so a shard is mapped only while its
    unit is being written (peak memory: one unit's pages, one tensor's copy).
    """

    def __init__(self, name: str, specs: Sequence[TensorSpec], open_fetch: Callable[[], contextlib.AbstractContextManager[Fetch]]):
        self.name, self.specs, self.open_fetch = name, list(specs), open_fetch
        self.quantized: list[QuantRecord] = []  # weights whose specs are their quantized parts (quantize_sources)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                leave=False, dynamic_ncols=True)


def _prepare_folder(path: str, fp: str) -> dict[str, dict[str, Any]]:
    """Create or resume a conversion folder; return units already finished by an earlier run."""
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, IN_PROGRESS)
    entries = [e for e in os.listdir(path) if not e.startswith(".")]
    if os.path.exists(marker):
        try:
            with open(marker) as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError):
            lines = []
        head = lines[0] if lines else {}
        done = {d["name"]: d for d in lines[1:] if isinstance(d, dict) and "name" in d}
        if head.get("fingerprint") == fp:
            return done
        # An interrupted conversion of something else: remove only the files it wrote.
        for d in done.values():
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, str(d.get("file", ""))))
        for e in os.listdir(path):
            if e.startswith(".") and ".tmp-" in e:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, e))
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
    elif os.path.exists(os.path.join(path, MANIFEST)):
        raise StoreError(f"{path} already holds a store: open it, or delete it to convert again")
    if entries and not os.path.exists(marker):
        raise StoreError(f"{path} is not empty and is not an offload store ({len(entries)} entries, e.g. "
                         f"{sorted(entries)[:3]}); refusing to write into it: choose an empty or new folder")
    with open(marker, "w") as f:
        f.write(json.dumps({"fingerprint": fp}) + "\n")
    return {}


def write_store(path: str | os.PathLike[str], units: Sequence[UnitSource], source: dict[str, Any],
                resident: UnitSource | None = None, progress: bool = True, extra: dict[str, Any] | None = None,
                files: Sequence[str] = (), edit: dict[str, Callable[[bytes], bytes]] | None = None) -> Store:
    """Write (or finish writing) a store from unit sources and return it opened.

    ``files`` (config, tokenizer) are copied in under their own names before the manifest is
    written, so a store with a manifest has all of them; ``edit[file]`` rewrites one on the way.
    """
    path = os.fspath(path)
    fp = str(source.get("fingerprint", ""))
    existed = os.path.exists(path)
    done = _prepare_folder(path, fp)
    todo = list(units) + ([resident] if resident is not None else [])
    # Every unit file is its data + a header page + at most a page of padding; the side files are small.
    needed = sum(plan_layout(u.specs)[1] + 2 * PAGE for u in todo if u.name not in done)
    needed += sum(os.path.getsize(f) for f in files)
    try:
        ensure_free_space(path, needed, f"writing the store {path} ({len(todo) - len(done)} unit files)")
    except OffloadError:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)  # leave nothing behind for a write that never started
        elif not done:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, IN_PROGRESS))
        raise
    # A fingerprint of files (a checkpoint's names, sizes, mtimes, header hashes) identifies the bytes a
    # finished unit was written from; one of shapes (a module's weights, held in memory) does not: two
    # models of the same shapes share it, so each unit an earlier run finished is checked by content.
    by_content = source.get("kind") == "module" or fp.startswith("content:")
    records: list[UnitRecord] = []
    bar = _progress(sum(u.nbytes for u in todo), f"offload: writing store {os.path.basename(path)}", progress)
    marker = os.path.join(path, IN_PROGRESS)
    try:
        for index, u in enumerate(todo):
            file = unit_file_name(index, u.name)
            prev = done.get(u.name)
            if prev is not None and prev.get("file") == file:
                try:
                    rec = _parse_unit(prev, marker)
                    if os.path.getsize(os.path.join(path, file)) == rec.file_bytes and (
                            not by_content or _same_content(u, rec)):
                        records.append(rec)
                        bar.update(u.nbytes)
                        continue
                except (StoreError, OSError):
                    pass
            with u.open_fetch() as fetch:
                rec = write_unit_file(path, file, u.name, u.specs, fetch, bar.update)
            rec = dataclasses.replace(rec, quantized=tuple(u.quantized))
            records.append(rec)
            with open(marker, "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")
    finally:
        bar.close()
    stored = _copy_side_files(path, files, edit)
    res = records.pop() if resident is not None else None
    write_manifest(path, records, source, res, dict(extra or {}, side_files=stored) if stored else extra)
    return Store.open(path)


def _copy_side_files(path: str, files: Sequence[str], edit: dict[str, Callable[[bytes], bytes]] | None
                     ) -> dict[str, str]:
    """Copy config/tokenizer files into a store (``edit[file]`` rewrites one on the way); return the
    SHA-256 of each copy as written, for the manifest's ``side_files`` (``Store.check_side_files``)."""
    stored = {}
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        if edit and f in edit:
            raw = edit[f](raw)
        write_atomic(os.path.join(path, os.path.basename(f)), raw)
        stored[os.path.basename(f)] = hashlib.sha256(raw).hexdigest()
    return stored


def _same_content(u: UnitSource, rec: UnitRecord) -> bool:
    """Does the unit file an earlier run finished hold exactly ``u``'s bytes (its recorded checksum)?"""
    with u.open_fetch() as fetch:
        return unit_crc(u.name, u.specs, fetch) == rec.crc32


def write_atomic(final: str, data: bytes | Iterable[bytes]) -> None:
    """Write ``final`` under a temporary name beside it, fsync, rename: it appears complete or not at all."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(final)), f".{os.path.basename(final)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
