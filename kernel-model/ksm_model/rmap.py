"""A process's rmap_items (struct ksm_rmap_item) as arrays indexed by address, not objects.

The kernel keeps one rmap_item per (mm, address) in a list sorted by address. The model keeps
the same information per process in chunks of SIZE consecutive page numbers, so an item costs
one list slot and one 16-bit word instead of an object and an address int:

* ``st[j]``, a 16-bit state word: EXISTS, the UNSTABLE flag with the low 6 bits of the
  seqnr it was inserted in, ``age`` and ``remaining_skips`` (smart scan). The kernel keeps 8
  bits of seqnr and lets age saturate at 255; an UNSTABLE item is never more than one scan
  old (every visit, skip or free takes the flag off) and ages from 9 on are all treated
  alike (skip_age 8), so 6 bits and a saturation at 15 give the same results;
* ``ock[j]``, the slot: for an item in no tree or in the unstable tree its ``oldchecksum``
  (the content key seen at the last checksum, None for the initial 0); for a STABLE item the
  StableNode it hangs from (the kernel's ``head``; oldchecksum is then the node's content,
  which it is whenever the item was merged after a checksum), or a StableRef when the
  oldchecksum differs (an item appended to a forked KSM page without a checksum).

Items are independent of VMAs (they outlive munmap until ksmd passes their addresses, and
are reused if a page appears there again), and address order is chunk order then index.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections.abc import Iterator
from itertools import compress
from typing import Any

SHIFT = 9
SIZE = 1 << SHIFT  # page numbers per chunk
MASK = SIZE - 1

# The state word (0: no rmap_item at this address).
EXISTS = 1
UNSTABLE = 2  # UNSTABLE_FLAG
SEQ_SHIFT = 2  # bits 2-7: the low 6 bits of the seqnr at insertion
SEQ_MASK = 0x3F
TREE = UNSTABLE | SEQ_MASK << SEQ_SHIFT
AGE_SHIFT = 8  # bits 8-11: age (saturates at AGE_MAX)
AGE_ONE = 1 << AGE_SHIFT
AGE_MAX = 15
SKIP_SHIFT = 12  # bits 12-15: remaining_skips (at most 8)
SKIP_ONE = 1 << SKIP_SHIFT

_ZEROS = bytes(2 * SIZE)
_INDEX = range(SIZE)
assert array("H").itemsize == 2


def unstable_bits(seqnr: int) -> int:
    """The TREE bits of an item inserted into the unstable tree in full scan `seqnr`."""
    return UNSTABLE | (seqnr & SEQ_MASK) << SEQ_SHIFT


class StableRef:
    """The slot of a STABLE item whose oldchecksum is not its node's content."""

    __slots__ = ("node", "oldck")

    def __init__(self, node: Any, oldck: bytes | None) -> None:
        self.node = node
        self.oldck = oldck


class Chunk:
    """The rmap_items of SIZE consecutive page numbers of one process, from ``base``."""

    __slots__ = ("base", "mm", "n", "ock", "st", "tag")

    def __init__(self, mm: Any, base: int) -> None:
        self.mm = mm
        self.base = base
        self.n = 0  # items in this chunk
        self.ock: list[Any] = [None] * SIZE
        self.st = array("H", _ZEROS)
        self.tag: CTag | None = None  # unstable-tree entries of this chunk's current scan


class CTag:
    """What the unstable tree's dict maps a content to: the chunk of the item inserted under
    it and the full scan it was inserted in (an entry of an older scan is void). One tag per
    (chunk, scan) is shared by every insert of that chunk in that scan."""

    __slots__ = ("chunk", "seq")

    def __init__(self, chunk: Chunk, seq: int) -> None:
        self.chunk = chunk
        self.seq = seq


def ctag(c: Chunk, seqnr: int) -> CTag:
    """The chunk's tag for full scan `seqnr`."""
    tag = c.tag
    if tag is None or tag.seq != seqnr:
        tag = c.tag = CTag(c, seqnr)
    return tag


def locate(tag: CTag, key: bytes) -> int:
    """The index in tag.chunk of the item in the unstable tree under `key` (a live entry)."""
    c = tag.chunk
    ock, st = c.ock, c.st
    want = unstable_bits(tag.seq)
    j = -1
    while True:
        j = ock.index(key, j + 1)  # ValueError here would be a broken tree
        if st[j] & TREE == want:
            return j


class Rmap:
    """One process's rmap_items, by chunk; ``fp`` is ksmd's rmap_list cursor in this mm
    (every item below it has been passed in the current walk)."""

    __slots__ = ("chunks", "count", "fp", "keys", "useq")

    def __init__(self) -> None:
        self.chunks: dict[int, Chunk] = {}
        self.keys: list[int] = []  # sorted chunk numbers
        self.count = 0  # items
        self.fp = 0
        self.useq = -1  # the last full scan in which this mm inserted into the unstable tree

    def chunk(self, mm: Any, pn: int) -> Chunk:
        """The chunk holding page number pn (created if needed)."""
        cn = pn >> SHIFT
        c = self.chunks.get(cn)
        if c is None:
            c = self.chunks[cn] = Chunk(mm, cn << SHIFT)
            insort(self.keys, cn)
        return c

    def find(self, pn: int) -> tuple[Chunk, int] | None:
        """(chunk, index) of the item at page number pn, or None if there is none."""
        c = self.chunks.get(pn >> SHIFT)
        if c is None or not c.st[pn & MASK]:
            return None
        return c, pn & MASK

    def span(self, lo: int, hi: int) -> Iterator[Chunk]:
        """The chunks with items that overlap page numbers [lo, hi), in address order."""
        keys = self.keys
        i = bisect_left(keys, lo >> SHIFT)
        while i < len(keys) and keys[i] << SHIFT < hi:
            c = self.chunks.get(keys[i])
            if c is not None and c.n:
                yield c
            i += 1

    def items(self) -> Iterator[tuple[Chunk, int]]:
        """Every item as (chunk, index), in address order."""
        for c in self.span(0, 1 << 62):
            for j in compress(_INDEX, c.st):
                yield c, j

    def prune(self) -> None:
        """Drop the chunks that hold no item."""
        empty = [cn for cn, c in self.chunks.items() if not c.n]
        if empty:
            for cn in empty:
                del self.chunks[cn]
            self.keys = sorted(self.chunks)
