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


def compare(a: bytes, b: bytes, page_size: int) -> int:
    """memcmp(page_a, page_b) sign: -1, 0 or 1."""
    if a == b:
        return 0
    la, lb = len(a), len(b)
    if la == 1 and lb == 1:
        return -1 if a < b else 1
    if la == lb and a[:3] == b[:3]:
        # Same fill byte, same offset, middles of one length: the pages differ only inside
        # the middles, whose byte order is the keys' (a fast path: no page is built).
        return -1 if a < b else 1
    oa = a[1] << 8 | a[2] if la > 1 else 0
    ob = b[1] << 8 | b[2] if lb > 1 else 0
    # The first bytes of the pages decide most comparisons (a fill byte, or a middle's).
    ca = a[0] if oa or la == 1 else a[3]
    cb = b[0] if ob or lb == 1 else b[3]
    if ca != cb:
        return -1 if ca < cb else 1
    # Both pages are their fill byte from the end of their middles on, so they differ within
    # the first max(ends) + 1 bytes unless they are equal: only that prefix is built.
    ea = oa + la - 3 if la > 1 else 0
    eb = ob + lb - 3 if lb > 1 else 0
    n = (ea if ea > eb else eb) + 1
    if n > page_size:
        n = page_size
    fa, fb = a[:1], b[:1]
    pa = fa * oa + a[3:] + fa * (n - ea) if la > 1 else a * n
    pb = fb * ob + b[3:] + fb * (n - eb) if lb > 1 else b * n
    if pa == pb:
        pa, pb = materialize(a, page_size), materialize(b, page_size)
    return -1 if pa < pb else (1 if pa > pb else 0)
