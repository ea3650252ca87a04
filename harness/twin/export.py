"""`ksmh export --twin [--what-if NAME:K=V,...]`: the exporter with live twins beside the kernel.

Serves source="kernel" (the real KSM), source="model" (the twin, harness.twin.live) and one
source="what-if:NAME" per what-if, plus the twin's own series (harness.twin.collector), on one
endpoint. Root is needed: the twin reads other processes' memory (/proc/PID/mem, pagemap).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from harness.errors import HarnessError
from harness.paths import is_root


def add_export_options(p: Any) -> None:
    """The twin's options of `ksmh export`."""
    p.add_argument(
        "--twin",
        action="store_true",
        help="also run a model in lockstep with the kernel and serve it as source=model",
    )
    p.add_argument(
        "--what-if",
        action="append",
        default=[],
        metavar="NAME:KNOB=VALUE[,...]",
        help="a twin with other knobs, served as source=what-if:NAME (repeat; implies --twin)",
    )
    p.add_argument(
        "--twin-every",
        type=int,
        default=1,
        metavar="N",
        help="capture every N full scans at least (default 1; the CPU budget may raise it)",
    )
    p.add_argument(
        "--twin-cpu",
        default="5%",
        metavar="SHARE",
        help="CPU budget of the twin, a share of one core (default 5%%)",
    )
    p.add_argument("--twin-poll", type=float, default=0.2, help=argparse.SUPPRESS)


def wants_twin(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "twin", False) or getattr(args, "what_if", []))


def export_twin(
    args: argparse.Namespace,
    watch: Callable[[], Mapping[int, str]] | None = None,
    sharing: Callable[[], Any] | None = None,
) -> int:
    """Serve the kernel (with the --pid processes `watch` names and the --sharing matrix),
    the twin and the what-ifs until interrupted (Ctrl-C: the CLI's exit 130)."""
    from harness import units
    from harness.exporter import ExportTarget, KsmCollector, parse_listen, serve_registry
    from harness.ksm.select import open_backend
    from harness.ksm.sysfs import SysfsBackend
    from harness.sides.kernel import KernelSide
    from harness.twin import calibration, knobs
    from harness.twin.collector import TwinCollector
    from harness.twin.live import Twin

    what_ifs = [knobs.what_if(w) for w in args.what_if]
    names = [n for n, _ in what_ifs]
    if len(set(names)) != len(names):
        raise HarnessError("--what-if: each NAME once", hint=f"names given: {', '.join(names)}")
    budget = units.share(args.twin_cpu, "--twin-cpu")
    parse_listen(args.listen)
    backend = open_backend("kernel", root=args.sysfs_root, proc=args.proc_root)
    assert isinstance(backend, SysfsBackend)
    if not is_root():
        raise HarnessError(
            "the twin reads the memory of the processes KSM scans: it needs root",
            hint="run `sudo ksmh export --twin`, or export without --twin",
        )
    cal = calibration.load()
    if cal is None:
        print(
            "ksmh: no ksmd calibration for this kernel (`ksmh calibrate`): the models' ksmd CPU "
            "is their own rough figure",
            file=sys.stderr,
        )
    twin = Twin(
        backend,
        what_ifs=what_ifs,
        calibration=cal,
        every=args.twin_every,
        cpu_budget=budget,
        poll=args.twin_poll,
        proc=args.proc_root,
    )
    host = args.host or ExportTarget(backend=backend).host
    side = KernelSide(backend, args.proc_root)
    targets = [ExportTarget(backend, host, watch, side.ksmd_cpu_seconds, sharing)]
    for m in twin.models:
        targets.append(ExportTarget(m.side.published, host, None, _model_cpu(twin, m.source)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KsmCollector(targets))
    registry.register(TwinCollector(twin, host))
    server, _thread = serve_registry(registry, args.listen)
    h, port = parse_listen(args.listen)
    url = f"http://{f'[{h}]' if ':' in h else h}:{port}/metrics"
    sources = ", ".join(m.source for m in twin.models)
    print(f"ksmh: exporting kernel, {sources} KSM metrics on {url}", flush=True)
    twin.start()
    try:
        last = ""
        while True:
            time.sleep(1)
            stats, _ = twin.snapshot()
            if stats.last_error and stats.last_error != last:
                last = stats.last_error
                print(f"ksmh: twin: {last}", file=sys.stderr, flush=True)
    finally:
        twin.stop()
        server.shutdown()


def _model_cpu(twin: Any, source: str) -> Any:
    def cpu() -> float | None:
        v: float | None = twin.model_cpu(source)
        return v

    return cpu
