"""Readers return exactly the bytes a plain read returns, and fail clearly."""
from __future__ import annotations

import os
import random
import sys

import pytest

import threading

from offload import _native
from offload.io import MmapReader, PythonReader, get_reader
from offload.staging import HostBuffer

READERS = [PythonReader(direct=True), PythonReader(direct=False), MmapReader()]
if _native.load_error() is None:
    # small chunks and a shallow queue so a few hundred KB make many requests and reuse slots
    READERS += [_native.NativeReader("threads", depth=4, chunk_bytes=8192),
                _native.NativeReader("threads", depth=3, chunk_bytes=4096, direct=False),
                _native.NativeReader("threads", depth=4, chunk_bytes=8192, bounce=True)]
    READERS[-1].bounce_chunk, READERS[-1].bounce_min_read = 8192, 0  # through a bounce region: many requests
    if _native.uring_available():
        READERS += [_native.NativeReader("uring", depth=4, chunk_bytes=8192),
                    _native.NativeReader("uring", depth=2, chunk_bytes=4096, direct=False)]
IDS = [f"{r.name}-{'direct' if getattr(r, 'direct', False) else 'buffered'}{'-bounce' if getattr(r, 'bounce', 0) else ''}"
       for r in READERS]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "data.bin"
    rnd = random.Random(0)
    payload = bytes(rnd.getrandbits(8) for _ in range(3 * 4096 * 16 + 1234))  # unaligned tail
    path.write_bytes(payload)
    return str(path), payload


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_random_ranges_match_plain_read(data_file, reader):
    path, payload = data_file
    rnd = random.Random(1)
    buf = HostBuffer(len(payload))
    h = reader.open(path)
    try:
        cases = [(0, len(payload)), (len(payload) - 1234, 1234), (4096, 8192), (0, 0)]
        cases += [(o, rnd.randrange(0, len(payload) - o)) for o in (rnd.randrange(len(payload)) for _ in range(40))]
        cases += [(a * 4096, b * 4096) for a, b in ((rnd.randrange(40), rnd.randrange(1, 8)) for _ in range(20))]
        for off, n in cases:
            reader.read(h, off, buf.view(0, n))
            assert bytes(buf.view(0, n)) == payload[off:off + n], (off, n)
    finally:
        reader.close(h)


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_reading_past_eof_is_a_clear_error(data_file, reader):
    path, payload = data_file
    buf = HostBuffer(len(payload) + 8192)
    h = reader.open(path)
    try:
        with pytest.raises(OSError, match="short read") as e:
            reader.read(h, 0, buf.view(0, len(payload) + 4096 - 1234 + 4096))
        assert e.value.filename == path
    finally:
        reader.close(h)


def test_missing_file_names_it(tmp_path):
    for reader in READERS:
        with pytest.raises(FileNotFoundError) as e:
            reader.open(str(tmp_path / "nope"))
        assert e.value.filename == str(tmp_path / "nope")


def test_host_buffer_is_page_aligned():
    b = HostBuffer(10)
    assert b.nbytes == 4096 and b.address % 4096 == 0 and b.tensor.numel() == 4096


def _resident_bytes(address: int, length: int) -> int:
    """Bytes of [address, address+length) that are in RAM (mincore: exact, per 4 KiB page)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (length + 4095) // 4096
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore, THP: Linux")
def test_large_host_buffer_is_huge_page_aligned_and_resident_exactly_nbytes():
    nbytes = 5 * (2 << 20) + 3 * 4096  # five huge pages and a 4 KiB-page tail
    b = HostBuffer(nbytes)
    assert b.address % (2 << 20) == 0 and b.tensor.numel() == b.nbytes == nbytes
    b.tensor.fill_(7)
    base = b.address - b._pad  # the whole mapping, alignment slack included
    assert _resident_bytes(base, len(b._mm)) == nbytes  # slack never touched, the tail not rounded up
    assert bytes(b.view(nbytes - 3, 3)) == b"\x07\x07\x07"
    plain = HostBuffer(nbytes, huge=False)
    assert not plain.huge and plain.address % 4096 == 0 and plain.tensor.numel() == nbytes


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_reads_across_huge_page_boundaries_match_plain_read(tmp_path, reader):
    rnd = random.Random(2)
    payload = rnd.randbytes(3 * (2 << 20) + 777)
    path = tmp_path / "big.bin"
    path.write_bytes(payload)
    buf = HostBuffer(len(payload) + (2 << 20))
    h = reader.open(str(path))
    try:
        for _ in range(12):
            off = rnd.randrange(0, len(payload) // 4096) * 4096
            n = rnd.randrange(1, len(payload) - off + 1)
            at = (2 << 20) - rnd.randrange(1, 64) * 4096  # destination straddles a huge page boundary
            reader.read(h, off, buf.view(at, n))
            assert bytes(buf.view(at, n)) == payload[off:off + n], (off, n, at)
    finally:
        reader.close(h)


def test_get_reader_validates_names():
    assert get_reader("python").name == "python"
    assert get_reader("mmap").name == "mmap"
    if _native.load_error() is None:
        assert get_reader("native").name == get_reader("native-threads").name == "native-threads"
        if _native.uring_available():
            assert get_reader("native-uring").name == "native-uring"
    with pytest.raises(ValueError, match="native, native-threads, native-uring, python, mmap"):
        get_reader("fast")


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_unaligned_buffer_and_offset(data_file, reader):
    """O_DIRECT cannot serve these; readers must fall back, not fail."""
    path, payload = data_file
    buf = HostBuffer(len(payload) + 4096)
    h = reader.open(path)
    try:
        for off, start, n in [(1, 0, 5000), (4096, 3, 8192), (17, 100, len(payload) - 17)]:
            reader.read(h, off, buf.view(start, n))
            assert bytes(buf.view(start, n)) == payload[off:off + n]
    finally:
        reader.close(h)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "big.bin"
    payload = random.Random(1).randbytes(5 * (1 << 20) + 1234)  # over two bounce windows, an unaligned tail
    path.write_bytes(payload)
    return str(path), payload


DIRECT = [(r, i) for r, i in zip(READERS, IDS) if getattr(r, "direct", False) and not isinstance(r, MmapReader)]


@pytest.mark.parametrize("reader", [r for r, _ in DIRECT], ids=[i for _, i in DIRECT])
def test_big_unaligned_reads_go_direct_through_a_bounce_page(big_file, reader, monkeypatch):
    """A big read whose offset or buffer is not page aligned (a checkpoint's per-expert tensor) is read
    O_DIRECT through a bounce page, not through the page cache, and still exactly: across bounce
    windows, from either misalignment, and up to the file's partial last page (buffered)."""
    import offload.io
    path, payload = big_file
    buffered: list[int] = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (buffered.append(n), real(fd, off, n, advice)))
    buf = HostBuffer(len(payload) + 8192)
    h = reader.open(path)
    try:
        for off, start, n in [(2216, 0, 3 << 20), (4096, 424, 2 << 20), (1, 4096, (2 << 20) + 5)]:
            reader.read(h, off, buf.view(start, n))
            assert bytes(buf.view(start, n)) == payload[off:off + n]
        assert buffered == [] and getattr(h, "buffered_fd", -1) == -1  # no byte through the page cache
        off = len(payload) - (3 << 20) - 7  # to the end: the partial last page alone is buffered
        reader.read(h, off, buf.view(13, len(payload) - off))
        assert bytes(buf.view(13, len(payload) - off)) == payload[off:]
        assert buffered and max(buffered) < 4096
    finally:
        reader.close(h)
    assert offload.io.BOUNCE_MIN_BYTES <= 64 << 10


@pytest.mark.parametrize("reader", [r for r, _ in DIRECT], ids=[i for _, i in DIRECT])
def test_a_big_misaligned_read_past_the_end_or_into_read_only_memory_fails_plainly(big_file, reader):
    """Past the file's end: the short read naming the request (the Python reader recursed without end);
    into read-only memory: an error, never a write into it."""
    path, payload = big_file
    buf = HostBuffer(len(payload) + (1 << 20))
    h = reader.open(path)
    try:
        with pytest.raises(OSError, match=f"of {1 << 20} bytes at offset {len(payload) - 1000}"):
            reader.read(h, len(payload) - 1000, buf.view(3, 1 << 20))
        frozen = bytes(1 << 20)
        with pytest.raises((TypeError, BufferError)):
            reader.read(h, 1, memoryview(frozen))
        assert frozen == bytes(1 << 20)
    finally:
        reader.close(h)


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_concurrent_reads_into_distinct_buffers(data_file, reader):
    path, payload = data_file
    bufs = [HostBuffer(len(payload)) for _ in range(8)]
    errors = []

    def work(i):
        try:
            h = reader.open(path)
            try:
                for k in range(5):
                    off = ((i * 7 + k * 3) % 30) * 4096
                    reader.read(h, off, bufs[i].view(0, len(payload) - off))
                    assert bytes(bufs[i].view(0, len(payload) - off)) == payload[off:]
            finally:
                reader.close(h)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.skipif(_native.load_error() is not None, reason="native reader not built")
def test_bounce_regions_are_one_per_read_in_flight_and_the_last_given_back_goes_first():
    """Each read in flight has a region of its own (``depth`` requests); they are kept for the next reads,
    no more of them than were ever in flight at once, and the most recently used (hot) is taken first."""
    r = _native.NativeReader(depth=4, bounce=True)
    r.bounce_chunk = 4096
    taken = [r._take_bounce() for _ in range(3)]  # as if three reads were in flight at once
    assert len({b.tensor.data_ptr() for b in taken}) == 3 and all(b.nbytes == 4 * 4096 for b in taken)
    for b in taken:
        r._give_bounce(b)
    assert r._take_bounce() is taken[-1]
    assert r._take_bounce() is taken[-2]
    assert len(r._bounces) == 1  # nothing made while regions were idle


@pytest.mark.skipif(_native.load_error() is not None, reason="native reader not built")
def test_only_reads_of_bounce_min_read_or_more_go_through_a_region(data_file):
    path, payload = data_file
    r = _native.NativeReader(depth=4, bounce=True)
    r.bounce_chunk, r.bounce_min_read = 4096, 64 << 10
    buf = HostBuffer(len(payload))
    h = r.open(path)
    try:
        if not h.direct:
            pytest.skip("no O_DIRECT on this filesystem: regions are never used")
        r.read(h, 0, buf.view(0, 32 << 10))
        assert r._bounces == [] and bytes(buf.view(0, 32 << 10)) == payload[:32 << 10]  # direct
        r.read(h, 4096, buf.view(0, 128 << 10))
        assert len(r._bounces) == 1 and bytes(buf.view(0, 128 << 10)) == payload[4096:4096 + (128 << 10)]
    finally:
        r.close(h)


@pytest.mark.parametrize("reader", READERS, ids=IDS)
def test_closed_handle_is_a_clear_error(data_file, reader):
    path, _ = data_file
    buf = HostBuffer(8192)
    h = reader.open(path)
    reader.close(h)
    with pytest.raises((OSError, ValueError)):
        reader.read(h, 0, buf.view(0, 8192))


def test_unreadable_file_is_a_clear_error(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    for reader in READERS:
        try:
            h = reader.open(str(d))
        except OSError as e:  # mmap of a directory fails at open
            assert e.filename == str(d) or str(d) in str(e)
            continue
        try:
            with pytest.raises(OSError) as e:
                reader.read(h, 0, HostBuffer(4096).view(0, 4096))
            assert e.value.filename == str(d), reader.name
        finally:
            reader.close(h)
