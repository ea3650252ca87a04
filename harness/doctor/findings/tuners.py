"""Who changes the knobs: writers seen in the window, known tuning daemons, the advisor."""

from __future__ import annotations

from harness.doctor.analysis import Analysis
from harness.doctor.catalog import Evidence, Finding
from harness.doctor.findings.common import knob, window
from harness.doctor.watch import Write


def _who(w: Write) -> str:
    return w.cmdline or w.comm or "exited before it could be named"


def check(a: Analysis) -> list[Finding]:
    f = a.facts
    h = f.host
    if not h.present:
        return []
    out: list[Finding] = []
    secs = window(f)
    writers: dict[int, list[Write]] = {}
    if f.watch is not None:
        for w in f.watch.writes.values():
            writers.setdefault(w.pid, []).append(w)
    for pid, writes in sorted(writers.items()):
        ev = []
        for w in sorted(writes, key=lambda w: w.file):
            seen = ", ".join((f.watch.values if f.watch else {}).get(w.file, []))
            ev.append(
                Evidence(
                    str(h.ksm_root / w.file),
                    f"written {w.count} times in {secs:.1f} s by pid {pid}; values seen: {seen}",
                )
            )
        ev.append(Evidence(f"/proc/{pid}/cmdline", _who(writes[0])))
        files = ", ".join(sorted({w.file for w in writes}))
        out.append(
            Finding(
                "knob-writer",
                f"pid {pid} ({writes[0].comm or '?'})",
                f"pid {pid} ({_who(writes[0])}) rewrote {files} during the {secs:.1f} s window",
                tuple(ev),
                f"stop it or reconfigure it (kill {pid}, or disable the service that starts "
                "it) so that one owner sets KSM",
                pid=pid,
                data={"files": sorted({w.file for w in writes})},
            )
        )
    out += _unattributed(a, {w.file for ws in writers.values() for w in ws})
    named = set(writers)
    for t in f.tuners:
        if t.pid in named:
            continue
        out.append(
            Finding(
                "known-tuner",
                f"pid {t.pid} ({t.comm})",
                f"pid {t.pid} ({t.cmdline or t.comm}) tunes KSM: {t.why}",
                (Evidence(t.evidence_file, t.evidence_value),),
                f"stop it (e.g. systemctl disable --now {t.comm}; or kill {t.pid}) or put "
                "your settings in its configuration",
                pid=t.pid,
            )
        )
    if h.advisor == "scan-time":
        changes = (f.watch.values if f.watch else {}).get("pages_to_scan", [])
        ev = [knob(h, "advisor_mode"), knob(h, "advisor_target_scan_time")]
        if len(changes) > 1:
            ev.append(
                Evidence(
                    str(h.ksm_root / "pages_to_scan"),
                    f"changed by the kernel in {secs:.1f} s: {', '.join(changes)}",
                )
            )
        out.append(
            Finding(
                "advisor-active",
                "host",
                "advisor_mode is scan-time: the kernel sets pages_to_scan itself "
                f"(target {h.knobs.get('advisor_target_scan_time', '?')} s per full scan)",
                tuple(ev),
                "nothing to fix; ksmh set advisor_mode=none to choose pages_to_scan yourself",
            )
        )
    return out


def _unattributed(a: Analysis, written: set[str]) -> list[Finding]:
    """Knobs that changed with no writer seen: the advisor (pages_to_scan), or unknown."""
    f = a.facts
    if f.watch is None:
        return []
    changed = {
        name: values
        for name, values in sorted(f.watch.changed().items())
        if name not in written and not (name == "pages_to_scan" and f.host.advisor == "scan-time")
    }
    if not changed:
        return []
    why = (
        "the writer could not be named (not root: no fanotify)"
        if not f.watch.fanotify
        else "no process was seen writing them"
    )
    return [
        Finding(
            "knob-writer",
            "host",
            f"{', '.join(changed)} changed during the {window(f):.1f} s window: {why}",
            tuple(
                Evidence(str(f.host.ksm_root / name), "values seen: " + ", ".join(values))
                for name, values in changed.items()
            ),
            "find the process that writes them (run `ksmh doctor` as root to name it)",
            data={"files": list(changed)},
        )
    ]
