"""Content keys of memory pages, and reading pages through /proc/PID/mem at memory speed.

A page's key is 16 bytes: 4096 minus the number of NUL bytes it begins with (2 bytes, big
endian), the 6 bytes that follow them, then the page's 8-byte XXH3-64 digest. Two pages get
equal keys exactly when their contents are equal (barring a 2^-64 accident between pages
that also begin alike; XXH3 is not a cryptographic hash, so a guest that crafts a collision
on purpose could make the model merge two pages the kernel's memcmp keeps apart: it would
fool only the model, never the kernel). The head keeps the kernel's order: the KSM trees are
ordered by memcmp of the contents, and keys compared bytewise order pages as memcmp does
whenever the pages differ within their leading NULs and the 6 bytes after them (a page with
more leading NULs is the smaller; guest memory holds many pages that begin with NULs, which a
plain 8-byte prefix would leave to the digest to order: it missed 2 of 63 KSM pages of a
1-guest run). That order decides which searches pass a tree node: measured with 4 THP guests,
a zero-filled unstable-tree entry gone stale (its huge page split, the page remapped to the
zero page) stopped 69,771 of scan 2's searches in a model whose pages were ordered by a hash
alone, and the real ksmd merged 27,000 to 39,000 pages more in that scan; ordered by the
head, model and ksmd agree within a batch. XXH3 hashes a 4 KiB page in about a tenth of
BLAKE2b's time; keys_of() keys 3.4 GiB/s here (a third of the pages beginning with NULs), so
the capture is bound by reading, not keying.

Pages are read in chunks of READ_PAGES into one reused buffer (os.preadv): no new 1 MiB
object (and no page faults on fresh memory) per read, and the chunk stays in the CPU cache
between the copy out of the target and the hashing. Not process_vm_readv(2), though it copies
faster: it pins the pages (FOLL_PIN), and a read-only pin of a shared anonymous page unshares
it first, so it would break the KSM pages it reads (measured on 6.18: 16 merged pages read
that way became exclusive copies); /proc/PID/mem takes plain references. Every shadow
capture (harness.shadow, harness.twin.capture, the doctor) keys pages with these functions, so
their keys compare.
"""

from __future__ import annotations

import os

import numpy as np
import xxhash

PAGE = 4096
KEY_SIZE = 16
KEY_DTYPE = f"S{KEY_SIZE}"
READ_PAGES = 256  # pages per read of /proc/PID/mem: 1 MiB, cache-sized (see module docstring)

HEAD = 6  # bytes of the page after its leading NULs, in its key (see the module docstring)
MAX_NULS = PAGE - 16  # leading NULs a key records at most (the model page must hold the rest)
_digest = xxhash.xxh3_64_digest


def page_key(page: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte content key of one page (keys_of's, for one page)."""
    return keys_of(bytes(page), 1).view(np.uint8).tobytes()


def keys_of(buf: bytes | bytearray | memoryview, pages: int) -> np.ndarray:
    """The keys (dtype S16) of the first `pages` whole pages of `buf`."""
    view = memoryview(buf)
    arr = np.frombuffer(view, np.uint8, pages * PAGE).reshape(pages, PAGE)
    nuls = np.zeros(pages, dtype=np.int64)
    # Most pages begin with a byte that is not NUL: only the others need their NULs counted.
    lead = np.flatnonzero(arr[:, 0] == 0)
    if len(lead):
        nz = arr[lead] != 0
        nuls[lead] = np.where(nz.any(axis=1), nz.argmax(axis=1), PAGE)
    np.minimum(nuls, MAX_NULS, out=nuls)
    out = np.empty((pages, KEY_SIZE), dtype=np.uint8)
    out[:, :2] = (PAGE - nuls).astype(">u2").view(np.uint8).reshape(pages, 2)
    out[:, 2 : 2 + HEAD] = arr[np.arange(pages)[:, None], nuls[:, None] + np.arange(HEAD)]
    digest = _digest
    joined = b"".join([digest(view[i : i + PAGE]) for i in range(0, pages * PAGE, PAGE)])
    out[:, 2 + HEAD :] = np.frombuffer(joined, np.uint8).reshape(pages, KEY_SIZE - 2 - HEAD)
    return out.view(KEY_DTYPE).reshape(pages)


# Keys of the 256 uniform pages: a captured key found here is written into the model as a
# uniform page (so the zero page and use_zero_pages behave exactly as in the kernel).
UNIFORM_KEYS: dict[bytes, int] = {page_key(bytes([b]) * PAGE): b for b in range(256)}
ZERO_KEY = page_key(bytes(PAGE))
ZERO_KEY_NP = np.array(ZERO_KEY, dtype=KEY_DTYPE)


class PageReader:
    """Reads runs of pages of one /proc/PID/mem and keys them, through one reused buffer."""

    def __init__(self, fd: int, chunk_pages: int = READ_PAGES) -> None:
        self.fd = fd
        self.chunk = chunk_pages
        self.buf = bytearray(chunk_pages * PAGE)
        self.bytes_read = 0

    def key_run(self, addr: int, keys: np.ndarray) -> None:
        """Key the len(keys) pages from virtual address `addr` into `keys`. A chunk that
        cannot be read (unmapped under us) leaves its pages as they were (absent)."""
        view = memoryview(self.buf)
        for first in range(0, len(keys), self.chunk):
            want = min(self.chunk, len(keys) - first)
            try:
                got = os.preadv(self.fd, [view[: want * PAGE]], addr + first * PAGE)
            except OSError:
                continue
            self.bytes_read += got
            n = got // PAGE
            if n:
                keys[first : first + n] = keys_of(view, n)
