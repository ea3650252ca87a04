"""Physical page objects (the rmap_items are in rmap.py).

A page-table slot holds one of:

* ``None``: nothing mapped (never written, unmapped, or only ever read: the shared zero page);
* a content key (``bytes``): an exclusive anonymous page, i.e. mapped only here and not KSM;
  most pages are this, and cost no object of their own;
* a ``Page``: an anonymous page mapped by several PTEs after fork, or a KSM page (``node`` set);
* ``KZERO``: a zero-page PTE placed by KSM (use_zero_pages), not an anonymous page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ksm_model.stable import StableNode


class Page:
    """A physical anonymous page mapped by `mapcount` PTEs (freed at 0)."""

    __slots__ = ("key", "mapcount", "nid", "node")

    def __init__(self, key: bytes, mapcount: int, nid: int) -> None:
        self.key = key
        self.mapcount = mapcount
        self.nid = nid
        self.node: StableNode | None = None  # the stable node (dup) when this is a KSM page


class _KsmZero:
    """The KSM-placed zero-page PTE (pte_mkdirty(pte_mkspecial(zero pfn)))."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "KZERO"


KZERO: Any = _KsmZero()

SEQNR_MASK = 0xFF  # the kernel keeps the low 8 bits of seqnr in an UNSTABLE rmap_item
