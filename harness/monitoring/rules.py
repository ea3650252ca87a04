"""Prometheus recording and alert rules for KSM, as plain data (dumped to YAML by config.py).

Series come from harness.exporter (`ksm_*{source, host}`) and, for the model comparison, from
the runner's `ksm_model_delta{counter, host}`. After scraping, `host` is the inventory name
(the file_sd target label wins over the exporter's own, see config.py).

Recorded series (level:metric:operation, as the Prometheus naming guide suggests):
  host:ksm_saved_bytes:sum             saved bytes per host and source
  fleet:ksm_saved_bytes:sum            saved bytes over the fleet, per source
  host:ksm_sharing_ratio:ratio         pages_sharing / pages_shared   (how many sharers per page)
  host:ksm_waste_ratio:ratio           pages_unshared / pages_sharing (kernel doc: wasted effort)
  host:ksm_volatile_share:ratio        pages_volatile / all pages ksmd tracks
  host:ksm_full_scans:rate             full scans per second over the rate window
  host:ksm_pages_scanned:rate          pages scanned per second over the rate window
  host:ksm_model_delta:abs             |kernel - model| per counter, from the runner or the twin
  host:ksm_model_minus_kernel:pages    model - kernel per counter, from the two exporter sources
  host:ksm_ksmd_cpu:ratio              ksmd's CPU share of one core per source (rate of
                                       ksm_ksmd_cpu_seconds_total: measured, or a model's estimate)

`ksm_model_delta` comes from two places: the playbook runner (no `source` label; exact at its
sync points) and the exporter's live twin (`source="model"` or `"what-if:NAME"`, with
`ksm_model_delta_ratio`; it trails the kernel by up to a full scan). KsmModelDelta holds the
runner's to its tolerance in pages; KsmModelDivergence fires when the twin stays off by more
than a share of the kernel's value (and a number of pages) for `divergence_for`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Counters compared between source="model" and source="kernel" by the recording rules.
COMPARED_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared")


@dataclass(frozen=True)
class RuleSettings:
    """Thresholds, windows and for-durations; defaults suit production, tests shorten them."""

    rate_window: str = "5m"
    stall_window: str = "10m"
    stall_for: str = "15m"
    waste_ratio: float = 10.0
    waste_for: str = "30m"
    volatile_share: float = 0.5
    volatile_for: str = "30m"
    model_tolerance: int = 16  # pages; the model is meant to be counter-exact
    model_for: str = "5m"
    divergence_ratio: float = 0.05  # the live twin: |kernel - model| / kernel above this ...
    divergence_pages: int = 256  # ... and above this many pages ...
    divergence_for: str = "15m"  # ... for this long
    profit_for: str = "30m"  # general_profit below 0 this long
    ksm_off_for: str = "10m"
    exporter_down_for: str = "5m"
    expected_label: str = "ksm_expected"  # inventory label saying a host must run KSM
    expected_value: str = "true"
    interval: str | None = None  # rule group evaluation interval (None: the global one)

    def with_for(self, duration: str | None) -> RuleSettings:
        """Every alert's for-duration set to one value (the CLI's --for; tests use seconds)."""
        if duration is None:
            return self
        return replace(
            self,
            stall_for=duration,
            waste_for=duration,
            volatile_for=duration,
            model_for=duration,
            divergence_for=duration,
            profit_for=duration,
            ksm_off_for=duration,
            exporter_down_for=duration,
        )


K = '{source="kernel"}'


def _group(name: str, rules: list[dict[str, Any]], s: RuleSettings) -> dict[str, Any]:
    group: dict[str, Any] = {"name": name}
    if s.interval:
        group["interval"] = s.interval
    group["rules"] = rules
    return group


def recording_rules(s: RuleSettings | None = None) -> dict[str, Any]:
    """The recording-rules file as a dict."""
    s = s or RuleSettings()
    rules: list[dict[str, Any]] = [
        {"record": "host:ksm_saved_bytes:sum", "expr": "sum by (host, source) (ksm_saved_bytes)"},
        {"record": "fleet:ksm_saved_bytes:sum", "expr": "sum by (source) (ksm_saved_bytes)"},
        {
            "record": "host:ksm_sharing_ratio:ratio",
            "expr": "ksm_pages_sharing / (ksm_pages_shared > 0)",
        },
        {
            "record": "host:ksm_waste_ratio:ratio",
            "expr": "ksm_pages_unshared / (ksm_pages_sharing > 0)",
        },
        {
            "record": "host:ksm_volatile_share:ratio",
            "expr": "ksm_pages_volatile / ((ksm_pages_shared + ksm_pages_sharing"
            " + ksm_pages_unshared + ksm_pages_volatile) > 0)",
        },
        {
            "record": "host:ksm_full_scans:rate",
            "expr": f"rate(ksm_full_scans_total[{s.rate_window}])",
        },
        {
            "record": "host:ksm_pages_scanned:rate",
            "expr": f"rate(ksm_pages_scanned_total[{s.rate_window}])",
        },
        {"record": "host:ksm_model_delta:abs", "expr": "abs(ksm_model_delta)"},
        {
            "record": "host:ksm_ksmd_cpu:ratio",
            "expr": f"rate(ksm_ksmd_cpu_seconds_total[{s.rate_window}])",
        },
    ]
    for c in COMPARED_COUNTERS:
        # on(host): the model may be served by another exporter (the runner) than the kernel.
        diff = f'ksm_{c}{{source="model"}} - on(host) ksm_{c}{{source="kernel"}}'
        rules.append(
            {"record": "host:ksm_model_minus_kernel:pages", "expr": diff, "labels": {"counter": c}}
        )
    return {"groups": [_group("ksm.recording", rules, s)]}


def _alert(name: str, expr: str, for_: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": "warning"},
        "annotations": {"summary": summary, "description": description},
    }


def alert_rules(s: RuleSettings | None = None) -> dict[str, Any]:
    """The alert-rules file as a dict.

    Alerts use raw series, not the recorded ones, where they can: rule groups are evaluated
    independently, so a recorded series can lag an evaluation behind and shift when an alert
    fires. The model-delta alert uses the recorded per-counter differences (its margin is
    the for-duration; the test shows it).
    """
    s = s or RuleSettings()
    stalled = (
        f"(ksm_run{K} == 1)"
        f" and on(instance, host) (increase(ksm_full_scans_total{K}[{s.stall_window}]) == 0)"
        # Only with work to do: with nothing registered ksmd sleeps and full_scans stays flat.
        f" and on(instance, host) ((ksm_pages_shared{K} + ksm_pages_unshared{K}"
        f" + ksm_pages_volatile{K}) > 0)"
    )
    rules = [
        _alert(
            "KsmdStalled",
            stalled,
            s.stall_for,
            "ksmd makes no progress on {{ $labels.host }}",
            f"run=1 and pages to scan, but full_scans did not move in {s.stall_window}.",
        ),
        _alert(
            "KsmWastedEffort",
            f"ksm_pages_unshared{K} / (ksm_pages_sharing{K} > 0) > {s.waste_ratio:g}",
            s.waste_for,
            "KSM scans mostly unmergeable pages on {{ $labels.host }}",
            'pages_unshared / pages_sharing is {{ $value | printf "%.1f" }}, above '
            f"{s.waste_ratio:g}: ksmd spends its effort on pages that never merge.",
        ),
        _alert(
            "KsmVolatilePagesHigh",
            f"ksm_pages_volatile{K} / ((ksm_pages_shared{K} + ksm_pages_sharing{K}"
            f" + ksm_pages_unshared{K} + ksm_pages_volatile{K}) > 0) > {s.volatile_share:g}",
            s.volatile_for,
            "Most KSM-tracked pages change too fast on {{ $labels.host }}",
            "{{ $value | humanizePercentage }} of the pages ksmd tracks are volatile "
            f"(threshold {s.volatile_share:g}): MADV_MERGEABLE on fast-changing memory.",
        ),
        _alert(
            "KsmModelDelta",
            f'host:ksm_model_delta:abs{{source=""}} > {s.model_tolerance}',
            s.model_for,
            "The KSM model disagrees with the kernel on {{ $labels.host }}",
            "{{ $labels.counter }} differs by {{ $value }} pages, beyond the tolerance of "
            f"{s.model_tolerance}.",
        ),
        _alert(
            "KsmModelDivergence",
            f'abs(ksm_model_delta_ratio{{source="model"}}) > {s.divergence_ratio:g}'
            f' and abs(ksm_model_delta{{source="model"}}) > {s.divergence_pages}',
            s.divergence_for,
            "The live KSM twin diverges from the kernel on {{ $labels.host }}",
            "{{ $labels.counter }}: kernel and model differ by {{ $value | humanizePercentage }} "
            f"of the kernel's value (more than {s.divergence_ratio:g} and "
            f"{s.divergence_pages} pages) for {s.divergence_for}: the model no longer "
            "explains this host (a kernel change, a missed run=2, or a bug to report).",
        ),
        _alert(
            "KsmGeneralProfitNegative",
            f"ksm_general_profit_bytes{K} < 0",
            s.profit_for,
            "KSM costs more memory than it saves on {{ $labels.host }}",
            "general_profit is {{ $value | humanize1024 }}B: the rmap items of pages that never "
            "merge outweigh the merged pages. Narrow MADV_MERGEABLE, or turn KSM off here.",
        ),
        _alert(
            "KsmOffWhereExpected",
            f'ksm_run{{source="kernel", {s.expected_label}="{s.expected_value}"}} != 1',
            s.ksm_off_for,
            "KSM is not merging on {{ $labels.host }}",
            f"The inventory labels this host {s.expected_label}={s.expected_value} but "
            "run is {{ $value }}.",
        ),
        _alert(
            "KsmExporterDown",
            'up{job="ksm"} == 0',
            s.exporter_down_for,
            "The KSM exporter on {{ $labels.host }} does not answer",
            "Prometheus cannot scrape {{ $labels.instance }}; `ksmh hosts check` tells why.",
        ),
    ]
    return {"groups": [_group("ksm.alerts", rules, s)]}
