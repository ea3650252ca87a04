"""Page content keys (harness.pagekey): equal exactly when contents are equal, one key function
for every capture, and the chunked reader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from harness.pagekey import (
    KEY_DTYPE,
    KEY_SIZE,
    MAX_NULS,
    PAGE,
    UNIFORM_KEYS,
    ZERO_KEY,
    PageReader,
    keys_of,
    page_key,
)
from harness.shadow import ABSENT, capture_process
from harness.twin.capture import IncrementalCapture
from tests.unit.test_shadow import fake_proc


def near_pages() -> list[bytes]:
    """Pages that differ as little as pages can, with repeats: every uniform page, a base
    page with one bit flipped at every byte offset (both ends included), pages differing only
    in their last byte from a zero page (the trailing-NUL case of numpy S16), and repeats."""
    base = bytes(range(256)) * (PAGE // 256)
    pages = [bytes([b]) * PAGE for b in range(256)]
    for off in range(PAGE):
        p = bytearray(base)
        p[off] ^= 1 << (off % 8)
        pages.append(bytes(p))
    pages += [bytes(PAGE - 1) + bytes([b]) for b in range(1, 256)]
    pages += [base, base, bytes(PAGE), pages[300], pages[-1], os.urandom(PAGE)]
    return pages


def test_keys_are_equal_exactly_when_contents_are() -> None:
    pages = near_pages()
    keys = keys_of(b"".join(pages), len(pages))
    assert keys.dtype == np.dtype(KEY_DTYPE) and len(keys) == len(pages)
    full = [k.ljust(KEY_SIZE, b"\0") for k in keys.tolist()]
    by_content: dict[bytes, bytes] = {}
    by_key: dict[bytes, bytes] = {}
    for page, key in zip(pages, full, strict=True):
        assert by_content.setdefault(page, key) == key  # equal contents -> equal keys
        assert by_key.setdefault(key, page) == page  # equal keys -> equal contents
    assert len(by_key) == len(set(pages)) == len(pages) - 4  # base twice, and 3 repeats
    assert full == [page_key(p) for p in pages]  # the batch and the one-page keys agree
    assert ABSENT not in keys.tolist()  # no content keys as "absent"


def test_uniform_and_zero_keys() -> None:
    assert len(UNIFORM_KEYS) == 256 and sorted(UNIFORM_KEYS.values()) == list(range(256))
    assert UNIFORM_KEYS[ZERO_KEY] == 0 and page_key(bytes(PAGE)) == ZERO_KEY
    assert all(len(k) == KEY_SIZE for k in UNIFORM_KEYS)


def test_reader_keys_runs_in_chunks_and_stops_at_the_end(tmp_path: Path) -> None:
    pages = near_pages()[250:260]
    f = tmp_path / "mem"
    f.write_bytes(b"".join(pages) + b"x" * 100)  # a partial page at the end is not keyed
    fd = os.open(f, os.O_RDONLY)
    try:
        reader = PageReader(fd, chunk_pages=3)
        keys = np.zeros(12, dtype=KEY_DTYPE)
        reader.key_run(PAGE, keys)  # pages 1.. of the file: 9 whole ones, then the tail
    finally:
        os.close(fd)
    assert [k.ljust(KEY_SIZE, b"\0") for k in keys[:9].tolist()] == [page_key(p) for p in pages[1:]]
    assert keys[9:].tolist() == [ABSENT] * 3
    assert reader.bytes_read == 9 * PAGE + 100


def test_shadow_and_twin_captures_give_the_same_keys(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    (shadow,) = capture_process(7, "g0", proc).vmas
    (twin,) = IncrementalCapture(proc).capture({7: "g0"})[0].vmas
    # Both keep the THP view: page 5 (zeros in a THP) is a page ksmd visits, for either.
    assert twin.keys.tolist() == shadow.keys.tolist() and twin.huge == shadow.huge
    assert twin.keys[0].ljust(KEY_SIZE, b"\0") == page_key(b"\x5a" * PAGE)
    assert twin.keys[5].ljust(KEY_SIZE, b"\0") == ZERO_KEY
    assert [twin.keys[i] for i in (2, 3, 4)] == [ABSENT] * 3  # zero page, absent, file


def test_keys_and_model_pages_order_pages_as_memcmp_does() -> None:
    """The KSM trees are ordered by memcmp: wherever two pages differ within their leading
    NULs and the 6 bytes after them, their keys compare bytewise as the pages do, and so do
    the pages the model is given for them (by the model's own compare); the zero page stays
    below every model page."""
    from ksm_model.content import canon, compare

    from harness.shadow import model_page

    rng = np.random.default_rng(7)
    pages = [rng.bytes(PAGE) for _ in range(40)]
    pages += [bytes(PAGE - 8) + rng.bytes(8) for _ in range(10)]  # mostly zeros, leading NULs
    pages += [bytes([b]) * 8 + rng.bytes(PAGE - 8) for b in (0, 1, 0x5A, 0xFF)]
    pages += [bytes(n) + rng.bytes(PAGE - n) for n in (1, 7, 8, 9, 100, 1000, 1000, 4000)]

    def head(p: bytes) -> bytes:  # what a key holds of a page (at most MAX_NULS NULs)
        return p[: min(len(p) - len(p.lstrip(b"\0")), MAX_NULS) + 6]

    keys = [page_key(p) for p in pages]
    assert keys_of(b"".join(pages), len(pages)).tolist() == [k.rstrip(b"\0") for k in keys]
    model = [canon(model_page(k)) for k in keys]
    checked = 0
    for i, (a, ka, ma) in enumerate(zip(pages, keys, model, strict=True)):
        assert compare(canon(bytes(PAGE)), ma, PAGE) < 0  # the zero page is the least
        for b, kb, mb in zip(pages[i + 1 :], keys[i + 1 :], model[i + 1 :], strict=True):
            if head(a) == head(b):
                continue
            want = -1 if a < b else 1
            assert (-1 if ka < kb else 1) == want
            assert compare(ma, mb, PAGE) == want
            checked += 1
    assert checked > 1000
    # Uniform pages are written as themselves: a model page sorts against them by its first
    # bytes, as the real page does.
    for p, m in zip(pages, model, strict=True):
        for byte in (0x01, 0x5A, 0xFE):
            if head(p) != bytes([byte]) * len(head(p)):
                assert compare(m, bytes([byte]), PAGE) == (-1 if p < bytes([byte]) * PAGE else 1)
