"""Page contents as small canonical keys, never the page's bytes.

A key is a ``bytes`` object that is a pure function of the page's content, so two pages are
identical exactly when their keys are equal (this stands in for the kernel's checksum and
for ``pages_identical``). Forms:

* ``bytes([b])`` (length 1): every byte of the page is ``b``. These 256 keys are interned,
  so ``fill()`` of whole pages never materialises anything.
* ``bytes([b]) + off(2 bytes, big endian) + mid``: the page is ``b`` repeated, except for
  ``mid`` at offset ``off`` (``mid`` starts and ends with a byte != ``b``). ``b`` is the first
  or the last byte of the page, whichever gives the shorter key (ties: the smaller ``b``).

The stable tree needs the kernel's memcmp order between contents; ``compare`` materialises
both pages for that (the stable tree is small: one node per merged content), unless the two
keys differ only inside middles of one length at one offset, where the keys' order is the
pages' order.
"""

from __future__ import annotations

UNIFORM: tuple[bytes, ...] = tuple(bytes([b]) for b in range(256))
ZERO = UNIFORM[0]


def canon(page: bytes) -> bytes:
    """The key of a full page (len(page) == page size)."""
    first = page[0]
    if page.count(first) == len(page):
        return UNIFORM[first]
    best: bytes | None = None
    for b in {first, page[-1]}:
        bb = UNIFORM[b]
        off = len(page) - len(page.lstrip(bb))
        end = len(page.rstrip(bb))
        key = bb + off.to_bytes(2, "big") + page[off:end]
        if best is None or (len(key), key[0]) < (len(best), best[0]):
            best = key
    assert best is not None
    return best


def materialize(key: bytes, page_size: int) -> bytes:
    """The full page bytes of a key."""
    if len(key) == 1:
        return key * page_size
    b = key[:1]
    off = int.from_bytes(key[1:3], "big")
    mid = key[3:]
    return b * off + mid + b * (page_size - off - len(mid))


def patch(key: bytes, offset: int, data: bytes, page_size: int) -> bytes:
    """The key of page `key` after writing `data` at `offset` inside it."""
    if offset == 0 and len(data) == page_size:
        return canon(bytes(data))
    full = bytearray(materialize(key, page_size))
    full[offset : offset + len(data)] = data
    return canon(bytes(full))


def _prefix(key: bytes, n: int) -> bytes:
    """The first n bytes of the page of `key`, for n at least the end of its middle."""
    if len(key) == 1:
        return key * n
    b = key[:1]
    off = int.from_bytes(key[1:3], "big")
    return b * off + key[3:] + b * (n - off - len(key) + 3)


def _end(key: bytes) -> int:
    """Where the fill byte repeats to the end of the page (0 for a uniform page)."""
    return 0 if len(key) == 1 else int.from_bytes(key[1:3], "big") + len(key) - 3


def compare(a: bytes, b: bytes, page_size: int) -> int:
    """memcmp(page_a, page_b) sign: -1, 0 or 1."""
    if a == b:
        return 0
    if len(a) == 1 and len(b) == 1:
        return -1 if a < b else 1
    if len(a) == len(b) and a[:3] == b[:3]:
        # Same fill byte, same offset, middles of one length: the pages differ only inside
        # the middles, whose byte order is the keys' (a fast path: no page is built).
        return -1 if a < b else 1
    # Both pages are their fill byte from max(ends) on, so they differ within the first
    # max(ends) + 1 bytes unless they are equal (only that prefix is built).
    n = min(max(_end(a), _end(b)) + 1, page_size)
    pa, pb = _prefix(a, n), _prefix(b, n)
    if pa == pb:
        pa, pb = materialize(a, page_size), materialize(b, page_size)
    return (pa > pb) - (pa < pb)
