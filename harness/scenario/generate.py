"""Seeded random scenarios for differential testing: same seed, same scenario, on any machine.

Contents come from a small alphabet (three byte fills, zero pages, a few shared u-pages) plus
fresh unique pages, so duplicate groups of every size occur within and across processes. The
generator only produces valid scenarios: some process always stays live and mergeable, so
ksmd keeps completing full scans.

Besides the issue's list (writes, fork, exit, MADV_UNMERGEABLE, run=2, tunable writes) it
also uses partial ranges, MADV_MERGEABLE again, MADV_DONTNEED and late-joining processes.

Fork after use_zero_pages was on is included: the spec (section 18) left it open, and the real
kernel (6.18) showed that fork copies and counts KSM zero-page PTEs (diff-findings F1).

About a third of the scenarios turn one starting process (and some late joiners) into a THP
process (`thp: true`, 512..1100 pages: whole huge pages, often a partial one after them) with
contents built for huge pages: uniform, half identical, zero-filled heads or tails, runs. Those
choices come from a second random stream, so everything else in a seed's scenario is what it
was before THP processes existed.
"""

from __future__ import annotations

import random

from harness.scenario.spec import (
    Action,
    Dontneed,
    Exit,
    Fork,
    Mergeable,
    ProcessSpec,
    Rerun,
    Scenario,
    SetTunable,
    Spawn,
    Unmergeable,
    Write,
)

BYTES = ("a", "b", "c")
SHARED_UNIQUE = ("u:0", "u:1", "u:2", "u:3")
MAX_LIVE = 6
THP_SIZES = (512, 512, 700, 1024, 1100)  # pages: whole 2 MiB blocks, some with a small tail


class _Gen:
    def __init__(
        self, seed: int, max_processes: int, max_pages: int, max_scans: int, thp: bool
    ) -> None:
        self.rng = random.Random(seed)
        self.thp = thp
        self.max_processes = max_processes
        self.max_pages = max_pages
        self.max_scans = max_scans
        self.fresh = 1000  # u:<k> for k >= 1000 are used once each

    def unique(self) -> str:
        self.fresh += 1
        return f"u:{self.fresh}"

    def token(self) -> str:
        r = self.rng.random()
        if r < 0.45:
            return self.rng.choice(BYTES)
        if r < 0.6:
            return "zero"
        if r < 0.8:
            return self.rng.choice(SHARED_UNIQUE)
        return self.unique()

    def page_count(self) -> int:
        size = self.rng.choice(("tiny", "small", "medium", "large"))
        top = {"tiny": 4, "small": 32, "medium": 128, "large": self.max_pages}[size]
        return self.rng.randint(1, max(1, min(top, self.max_pages)))

    def pages(self) -> tuple[str, ...]:
        n = self.page_count()
        style = self.rng.choice(("uniform", "mixed", "unique", "blocks"))
        if style == "uniform":
            return (self.token(),) * n
        if style == "mixed":
            return tuple(self.token() for _ in range(n))
        if style == "unique":
            return tuple(
                self.unique() if self.rng.random() < 0.8 else self.token() for _ in range(n)
            )
        out: list[str] = []
        while len(out) < n:
            out += [self.token()] * self.rng.randint(1, max(1, n // 3))
        return tuple(out[:n])

    def scenario(self, seed: int) -> Scenario:
        rng = self.rng
        procs = tuple(
            ProcessSpec(f"p{i + 1}", self.pages())
            for i in range(rng.randint(1, self.max_processes))
        )
        tunables = {
            "max_page_sharing": rng.choice((2, 3, 256, 256)),
            "use_zero_pages": rng.randint(0, 1),
            "smart_scan": rng.randint(0, 1),
        }
        if rng.random() < 0.3:
            # Prune chains at every lookup (the runner default never prunes during a run).
            tunables["stable_node_chains_prune_millisecs"] = 0
        scans = rng.randint(2, self.max_scans)
        actions = self.actions(procs, scans)
        if self.thp:
            procs, actions = _Thp(seed).apply(procs, actions)
        return Scenario(
            processes=procs,
            scans=scans,
            tunables=tuple(tunables.items()),
            actions=tuple(actions),
            name=f"random-{seed}",
            seed=seed,
        )

    def actions(self, procs: tuple[ProcessSpec, ...], scans: int) -> list[Action]:
        rng = self.rng
        size = {p.name: len(p.pages) for p in procs}
        alive = [p.name for p in procs]
        # Pages in VM_MERGEABLE ranges per process, to keep some mm registered (ksmd busy).
        merge = {p.name: set(range(len(p.pages))) for p in procs}
        born = 0
        out: list[Action] = []

        def others_active(name: str) -> bool:
            return any(merge[n] for n in alive if n != name)

        def span(name: str) -> tuple[int, int | None]:
            if rng.random() < 0.5:
                return 0, None
            first = rng.randrange(size[name])
            return first, rng.randint(1, size[name] - first)

        for f in range(1, scans):
            for _ in range(rng.choice((0, 0, 1, 1, 2))):
                out.append(self.write(f, rng.choice(alive), size))
            r = rng.random()
            name = rng.choice(alive)
            if r < 0.07 and len(alive) < MAX_LIVE:
                born += 1
                child = f"c{born}"
                out.append(Fork(f, name, child))
                size[child] = size[name]
                alive.append(child)
                merge[child] = set(merge[name])
            elif r < 0.12 and others_active(name):
                out.append(Exit(f, name))
                alive.remove(name)
            elif r < 0.17:
                first, count = span(name)
                pages = set(range(first, size[name] if count is None else first + count))
                if others_active(name) or merge[name] - pages:
                    out.append(Unmergeable(f, name, first, count))
                    merge[name] -= pages
            elif r < 0.21:
                first, count = span(name)
                out.append(Mergeable(f, name, first, count))
                merge[name] |= set(range(first, size[name] if count is None else first + count))
            elif r < 0.25:
                first, count = span(name)
                out.append(Dontneed(f, name, first, count))
            elif r < 0.29 and len(alive) < MAX_LIVE:
                born += 1
                spec = ProcessSpec(f"n{born}", self.pages())
                out.append(Spawn(f, spec))
                size[spec.name] = len(spec.pages)
                alive.append(spec.name)
                merge[spec.name] = set(range(len(spec.pages)))
            elif r < 0.33:
                out.append(Rerun(f))
                if rng.random() < 0.5:
                    out.append(SetTunable(f, "max_page_sharing", rng.choice((2, 3, 256))))
            elif r < 0.38:
                knob = rng.choice(("smart_scan", "use_zero_pages"))
                value = rng.randint(0, 1)
                out.append(SetTunable(f, knob, value))
            elif r < 0.40:
                # Refused with EBUSY while anything is merged: both sides must agree.
                out.append(SetTunable(f, "max_page_sharing", rng.choice((2, 3, 256))))
        return out

    def write(self, f: int, name: str, size: dict[str, int]) -> Write:
        rng = self.rng
        n = size[name]
        if rng.random() < 0.15:  # a burst: a whole range rewritten at once
            lo = rng.randrange(n)
            pages = list(range(lo, rng.randint(lo + 1, n)))
        else:
            pages = sorted(rng.sample(range(n), rng.randint(1, min(4, n))))
        return Write(f, name, tuple(pages), self.token())


class _Thp:
    """Turns some processes into THP processes, from its own random stream."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"thp-{seed}")
        self.fresh = 5000  # u:<k> for k >= 5000: unique pages of THP processes

    def apply(
        self, procs: tuple[ProcessSpec, ...], actions: list[Action]
    ) -> tuple[tuple[ProcessSpec, ...], list[Action]]:
        rng = self.rng
        if rng.random() >= 0.35:
            return procs, actions
        which = rng.randrange(len(procs))
        procs = tuple(self.huge(p) if i == which else p for i, p in enumerate(procs))
        out: list[Action] = []
        for a in actions:
            if isinstance(a, Spawn) and rng.random() < 0.3:
                a = Spawn(a.after, self.huge(a.spec))
            out.append(a)
        return procs, out

    def huge(self, p: ProcessSpec) -> ProcessSpec:
        """p as a THP process; its old pages stay at the start when they fit a style."""
        rng = self.rng
        n = max(len(p.pages), rng.choice(THP_SIZES))
        tok = rng.choice((*BYTES, "zero", "u:0"))
        style = rng.choice(("uniform", "half", "zero-tail", "zero-head", "runs", "extended"))
        if style == "uniform":
            pages = [tok] * n
        elif style == "half":
            pages = [tok] * (n // 2) + [self.unique() for _ in range(n - n // 2)]
        elif style == "zero-tail":
            k = rng.randint(1, n - 1)
            pages = [tok] * k + ["zero"] * (n - k)
        elif style == "zero-head":
            k = rng.randint(1, n - 1)
            pages = ["zero"] * k + [tok] * (n - k)
        elif style == "runs":
            pages = []
            while len(pages) < n:
                t = self.unique() if rng.random() < 0.2 else rng.choice((*BYTES, "zero"))
                pages += [t] * rng.randint(1, 300)
            pages = pages[:n]
        else:  # the old contents, then zero-filled pages up to n
            pages = list(p.pages) + ["zero"] * (n - len(p.pages))
        return ProcessSpec(p.name, tuple(pages), thp=True)

    def unique(self) -> str:
        self.fresh += 1
        return f"u:{self.fresh}"


def generate(
    seed: int,
    *,
    max_processes: int = 4,
    max_pages: int = 300,
    max_scans: int = 10,
    thp: bool = True,
) -> Scenario:
    """The random scenario for `seed` (deterministic across runs and machines).

    `max_pages` bounds ordinary processes; THP processes (512..1100 pages) come only with
    `thp`, and without it a seed gives exactly its scenario from before they existed.
    """
    return _Gen(seed, max_processes, max_pages, max_scans, thp).scenario(seed)
