"""A store folder, opened and validated: ``Store`` reads its manifest, checks its files and reads units.

One concept: the reader's side of a store. Opening checks everything that does not need the data
(manifest, paths that stay in their folder, file sizes and safetensors headers); ``read_unit`` /
``read_verified`` / ``verify_unit`` read and check a unit's bytes off the hot path (streaming goes
through the prefetcher's readers). The format is described in ``manifest``; writing is ``writer``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .errors import ChecksumError, StoreError, StoreMismatchError
from .integrity import _crc32c, check_chunks, crc32c_update, damaged_fix, read_safetensors_header
from .manifest import (CHECKSUMS, FORMAT, IN_PROGRESS, MANIFEST, MAX_HEADER_BYTES, VERSION, UnitRecord, _parse_unit,
                       main_float_dtype)
from .manifest import Extent, TensorRecord  # noqa: F401  (hooks and experts import the records from here)

log = logging.getLogger("offload")


def assemble(unit: UnitRecord, buf: torch.Tensor) -> None:
    """Copy the pieces of fused tensors into place, after a unit's reads (``TensorRecord.pieces``)."""
    for t in unit.tensors:
        at = t.offset
        for a, n in t.pieces:
            buf[at:at + n].copy_(buf[a:a + n])
            at += n


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
        self._identity = _identity(path)  # the folder this manifest came from (a rebuild swaps in another)
        self._pinned: dict[str, int] = {}  # path -> a descriptor a running handle holds open (Prefetcher)
        self._folder_fd: int | None = None  # the store's folder, held open by a running handle (pin_folder)

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
        if _identity(self.path) != self._identity:  # rebuilt and swapped since it was opened: not our folder
            log.info("offload: %s was replaced since this process opened it; its checksums are not written there",
                     self.path)
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

    def pin(self, path: str, fd: int | None) -> None:
        """Reads of ``path`` go through the file ``fd`` holds (``None``: by path again). A handle pins the
        files it opened at enable, so what it reads off its prefetcher (a stray use, ``state_dict()``,
        ``disable()``'s restore) comes from the same files as its forwards, even after a rebuild swapped
        the store or the file was removed."""
        if fd is None:
            self._pinned.pop(path, None)
        else:
            self._pinned[path] = fd

    def pin_folder(self, fd: int | None) -> None:
        """Files of this store not pinned are opened through the folder ``fd`` holds (``None``: by path) once
        a rebuild swapped another folder in at the store's path: a handle streaming more files than it keeps
        open reads its own store's, never the new one's under the old manifest."""
        self._folder_fd = fd

    def openable(self, path: str) -> str:
        """Where to open ``path``, one of this store's files, to read what this store's manifest describes."""
        fd = self._pinned.get(path)
        if fd is not None and os.path.exists(f"/proc/self/fd/{fd}"):
            return f"/proc/self/fd/{fd}"  # reopens that very file, whatever its path holds now (Linux)
        folder = self._folder_fd
        if (folder is not None and os.path.dirname(path) == self.path.rstrip("/")
                and _identity(self.path) != self._identity):
            return f"/proc/self/fd/{folder}/{os.path.basename(path)}"  # the folder this store was opened from
        return path

    def read_unit(self, unit: UnitRecord) -> torch.Tensor:
        """A unit's whole buffer, read with plain buffered reads and assembled (enable-time and off-path
        uses: the resident part, restoring weights on ``disable``, drafts; streaming goes through the
        prefetcher's readers)."""
        out = torch.empty(unit.data_bytes, dtype=torch.uint8)
        self._read_span(unit, 0, memoryview(out.numpy()))
        assemble(unit, out)
        return out

    def _read_span(self, unit: UnitRecord, at: int, dest: memoryview) -> None:
        """Bytes ``[at, at + len(dest))`` of the unit's buffer as its reads lay it out (before ``assemble``):
        each read's part in that span, and only that part."""
        end = at + len(dest)
        for e in unit.reads:
            lo, hi = max(at, e.into), min(end, e.into + e.length)
            if lo >= hi:
                continue
            path = self.path_of(unit, e.file)
            with open(self.openable(path), "rb") as f:
                f.seek(e.offset + lo - e.into)
                got = f.readinto(dest[lo - at:hi - at])
            if got != hi - lo:
                raise StoreError(f"{path} (unit {unit.name}) ended early: {got} of {hi - lo} bytes at offset "
                                 f"{e.offset + lo - e.into}: the file changed; re-run `offload convert` (a cached "
                                 f"store: --rebuild)")

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
        if unit.extents:  # read in place: only the reads' parts that hold it (a fused tensor: its pieces)
            out = torch.zeros(t.nbytes, dtype=torch.uint8)
            buf, done = memoryview(out.numpy()), 0
            for a, n in (t.pieces or ((t.offset, t.nbytes),)):
                self._read_span(unit, a, buf[done:done + n])
                done += n
            return out.view(t.torch_dtype).view(t.shape)
        path = _safe_path(self.path, unit.file, unit.name)
        out = torch.empty(t.nbytes, dtype=torch.uint8)
        with open(self.openable(path), "rb") as f:
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
                f"model does not have {extra[:5]}. {self._mismatch_fix()}")
        for name, tensors in expected.items():
            u = have[name]
            got = {t.name: (t.torch_dtype, t.shape) for t in u.tensors}
            if set(got) != set(tensors):
                raise StoreMismatchError(
                    f"store {self.path}, unit {name}: tensors differ (only in store: {sorted(set(got) - set(tensors))[:5]}, "
                    f"only in model: {sorted(set(tensors) - set(got))[:5]}). {self._mismatch_fix()}")
            for tname, (dtype, shape) in tensors.items():
                if got[tname] != (dtype, tuple(shape)):
                    raise StoreMismatchError(
                        f"store {self.path}, unit {name}, tensor {tname}: store has {got[tname][0]} {list(got[tname][1])}, "
                        f"model has {dtype} {list(shape)}. {self._mismatch_fix()}")

    def _mismatch_fix(self) -> str:
        """What to do about a store that does not match its model: a checkpoint read in place is the checkpoint's
        own bytes (its shards disagree with its config.json), a copy can be rebuilt."""
        if any(u.extents for u in self.units):
            src = self.source.get("path") or "the checkpoint folder"
            return (f"This store reads {src} in place, so its shards do not match its config.json (a damaged or "
                    f"wrong shard, or the wrong config): download the checkpoint again")
        return "Use another store folder or delete this one to rebuild it"


def _identity(path: str) -> tuple[int, int] | None:
    """The folder's (device, inode): a store renamed away and replaced by a rebuild has another."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
