"""NUMA: merges across nodes (remote access), or duplicates kept apart per node."""

from __future__ import annotations

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.findings.common import knob, subject


def check(a: Analysis) -> list[Finding]:
    f = a.facts
    h = f.host
    if not h.present or len(h.nodes) < 2:
        return []
    nodes = " ".join(f"node{n}" for n in h.nodes)
    mode = h.knob("merge_across_nodes")
    node_ev = Evidence("/sys/devices/system/node", nodes)
    if mode == 1:
        return [
            Finding(
                "numa-cross-node",
                "host",
                f"merge_across_nodes=1 on a host with {len(h.nodes)} NUMA nodes: a merged page "
                "lives on one node and is read remotely from the others",
                (knob(h, "merge_across_nodes"), node_ev),
                "if latency matters: pin guests to nodes, ksmh set run=2, "
                "ksmh set merge_across_nodes=0, ksmh set run=1",
            )
        ]
    out = []
    for pid, p in sorted(f.processes.items()):
        spread = {n: c for n, c in p.numa.items() if c}
        if len(spread) < 2:
            continue
        where = " ".join(f"N{n}={c}" for n, c in sorted(spread.items()))
        out.append(
            Finding(
                "numa-split",
                subject(p),
                f"{subject(p)}: its mergeable memory is on nodes "
                f"{', '.join(str(n) for n in sorted(spread))} and merge_across_nodes=0: "
                "identical pages on different nodes never merge",
                (knob(h, "merge_across_nodes"), node_ev,
                 Evidence(f"/proc/{pid}/numa_maps", f"mergeable VMAs: {where}")),
                f"bind it to one node (numactl --membind, or migratepages {pid} ...), or "
                "merge across nodes: ksmh set run=2, merge_across_nodes=1, run=1",
                pid=pid,
                data={"nodes": spread},
            )
        )  # fmt: skip
    if not out:
        out += _apart(a, node_ev)
    return out


def _apart(a: Analysis, node_ev: Evidence) -> list[Finding]:
    """Different processes on different nodes: their common pages cannot merge either."""
    f = a.facts
    by_node: dict[int, list[int]] = {}
    for pid, p in sorted(f.processes.items()):
        for n, c in p.numa.items():
            if c:
                by_node.setdefault(n, []).append(pid)
    if len(by_node) < 2:
        return []
    where = "; ".join(
        f"node {n}: " + ", ".join(f"pid {pid}" for pid in pids)
        for n, pids in sorted(by_node.items())
    )
    ev = [knob(f.host, "merge_across_nodes"), node_ev]
    ev += [
        Evidence(f"/proc/{pid}/numa_maps", "mergeable VMAs: " + " ".join(
            f"N{n}={c}" for n, c in sorted(p.numa.items()) if c))
        for pid, p in sorted(f.processes.items()) if p.numa
    ]  # fmt: skip
    return [
        Finding(
            "numa-split",
            "host",
            f"merge_across_nodes=0 and the examined mergeable memory is on several nodes "
            f"({where}): identical pages on different nodes never merge",
            tuple(ev),
            "bind processes with the same content to one node, or merge across nodes: "
            "ksmh set run=2, merge_across_nodes=1, run=1",
            data={"nodes": {str(n): pids for n, pids in by_node.items()}},
        )
    ]
