"""Readers return exactly the bytes a plain read returns, and fail clearly."""
from __future__ import annotations

import os
import random

import pytest

from offload.io import HostBuffer, MmapReader, PythonReader, get_reader

READERS = [PythonReader(direct=True), PythonReader(direct=False), MmapReader()]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("io") / "data.bin"
    rnd = random.Random(0)
    payload = bytes(rnd.getrandbits(8) for _ in range(3 * 4096 * 16 + 1234))  # unaligned tail
    path.write_bytes(payload)
    return str(path), payload


@pytest.mark.parametrize("reader", READERS, ids=lambda r: f"{r.name}-{getattr(r, 'direct', '')}")
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


@pytest.mark.parametrize("reader", READERS, ids=lambda r: f"{r.name}-{getattr(r, 'direct', '')}")
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


def test_get_reader_validates_names():
    assert get_reader("python").name == "python"
    assert get_reader("mmap").name == "mmap"
    with pytest.raises(ValueError, match="native, python, mmap"):
        get_reader("fast")
