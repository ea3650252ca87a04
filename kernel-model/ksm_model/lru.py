"""Per-CPU LRU folio batches (mm/swap.c cpu_fbatches.lru_add), as far as KSM can see them.

A freshly allocated small folio (write fault, copy-on-write, unshare) is not put on the LRU
at once: folio_add_lru() holds a reference to it in the faulting CPU's batch until the batch
is full (folio_batch_add leaves no space: 31 folios on 6.11+, 15 on older kernels) or drained.
That extra reference makes write_protect_page() fail, so such a page cannot be merged yet.

Drains: ksmd's lru_add_drain_all() at the start of every full scan (all CPUs); a large folio
(a THP) added on a CPU moves that CPU's whole batch at once; lru_add_drain() on the CPU that
zaps memory (munmap, MADV_DONTNEED, exit). Other tasks' allocations share a CPU's batch: the
model cannot see them unless told (Kernel.lru_other_allocations()).

Pages allocated between full scans are drained before ksmd sees them, so only allocations
while a scan is in progress are recorded.
"""

from __future__ import annotations

from typing import Any

Key = tuple[Any, int]  # (mm, page number) of a mapping of the folio


class LruBatches:
    """Every CPU's lru_add batch: which (mm, page) mappings hold a folio still in a batch."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.batches: dict[int, list[int]] = {}  # cpu -> folio ids, oldest first
        self.keys: dict[int, list[Key]] = {}  # folio id -> its mappings
        self.pending: dict[Key, int] = {}  # mapping -> id of the batched folio mapped there
        self.seq = 0

    def add(self, cpu: int, key: Key | None) -> None:
        """folio_add_lru of a small folio on `cpu` (key None: a folio outside the model)."""
        self.seq += 1
        fid = self.seq
        batch = self.batches.setdefault(cpu, [])
        batch.append(fid)
        if key is not None:
            self.keys[fid] = [key]
            self.pending[key] = fid
        if len(batch) >= self.size:  # folio_batch_add() returned no space left: move all
            self.drain(cpu)

    def drain(self, cpu: int) -> None:
        """lru_add_drain() on `cpu` (also what adding a large folio there does)."""
        batch = self.batches.pop(cpu, None)
        if not batch:
            return
        for fid in batch:
            for key in self.keys.pop(fid, ()):
                if self.pending.get(key) == fid:
                    del self.pending[key]

    def drain_all(self) -> None:
        """lru_add_drain_all()."""
        self.batches.clear()
        self.keys.clear()
        self.pending.clear()

    def blocked(self, key: Key) -> bool:
        """Is the folio mapped at `key` still in a batch (write_protect_page would fail)?"""
        return key in self.pending

    def forked(self, parent: Any, child: Any) -> None:
        """fork(): the child maps the parent's batched folios at the same addresses."""
        for (mm, pn), fid in list(self.pending.items()):
            if mm is parent:
                self.pending[(child, pn)] = fid
                self.keys[fid].append((child, pn))

    def in_batch(self, cpu: int) -> int:
        """Folios in `cpu`'s batch now."""
        return len(self.batches.get(cpu, ()))
