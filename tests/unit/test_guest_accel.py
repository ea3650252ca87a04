"""Accelerator choice: auto falls back to TCG, kvm unusable is an error saying why, cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.errors import AccelUnavailable
from harness.guests.accel import KvmVerdict, cached_verdict, resolve_accel, static_kvm_problem
from harness.guests.spec import GuestImage

IMAGE = GuestImage(Path("/k"), Path("/i"))
NOW = time.time()
HANGS = KvmVerdict(False, "a KVM guest did not reach userspace within 15 s", NOW, 15.0)
WORKS = KvmVerdict(True, "a KVM guest was ready in 0.9 s", 1.0, 0.9)


class Probe:
    def __init__(self, verdict: KvmVerdict) -> None:
        self.verdict = verdict
        self.calls = 0

    def __call__(self, image: GuestImage) -> KvmVerdict:
        self.calls += 1
        return self.verdict


def test_tcg_asked_for_needs_no_probe(tmp_path: Path) -> None:
    probe = Probe(WORKS)
    choice = resolve_accel("tcg", IMAGE, cache_path=tmp_path / "c.json", probe=probe)
    assert (choice.accel, probe.calls) == ("tcg", 0)


def test_auto_falls_back_to_tcg_and_caches_the_verdict(tmp_path: Path) -> None:
    probe = Probe(HANGS)
    cache = tmp_path / "sub" / "accel.json"
    first = resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h1")
    second = resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h1")
    assert (first.accel, first.cached) == ("tcg", False)
    assert (second.accel, second.cached) == ("tcg", True)
    assert first.reason == "KVM unusable, using TCG: " + HANGS.reason
    assert probe.calls == 1
    assert cached_verdict(cache, "h1") == HANGS
    # Another host key (another host or kernel) probes again.
    resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h2")
    assert probe.calls == 2


def test_kvm_unusable_is_an_error_that_says_why(tmp_path: Path) -> None:
    with pytest.raises(AccelUnavailable) as exc:
        resolve_accel("kvm", IMAGE, cache_path=tmp_path / "c.json", probe=Probe(HANGS))
    assert exc.value.message == (
        "--accel kvm asked for, but KVM cannot run a guest here: " + HANGS.reason
    )
    assert exc.value.hint is not None and "--accel tcg" in exc.value.hint


def test_kvm_usable(tmp_path: Path) -> None:
    for req in ("auto", "kvm"):
        choice = resolve_accel(req, IMAGE, cache_path=tmp_path / f"{req}.json", probe=Probe(WORKS))
        assert (choice.accel, choice.reason) == ("kvm", WORKS.reason)


def test_refresh_ignores_the_cache(tmp_path: Path) -> None:
    probe = Probe(WORKS)
    cache = tmp_path / "c.json"
    resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h")
    resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h", refresh=True)
    assert probe.calls == 2


def test_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "c.json"
    cache.write_text("{not json")
    probe = Probe(HANGS)
    assert resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h").accel == "tcg"
    assert probe.calls == 1


def test_static_problem_for_missing_device(tmp_path: Path) -> None:
    assert (
        static_kvm_problem(tmp_path / "kvm") == f"{tmp_path / 'kvm'} does not exist "
        "(no KVM module, or not passed into this container)"
    )


def test_a_failed_verdict_expires_and_a_working_one_does_not(tmp_path: Path) -> None:
    cache = tmp_path / "accel.json"
    old_fail = KvmVerdict(False, "timed out on a busy host", NOW - 7 * 3600, 15.0)
    probe = Probe(old_fail)
    resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h")
    again = resolve_accel("auto", IMAGE, cache_path=cache, probe=probe, key="h")
    assert probe.calls == 2 and not again.cached  # older than 6 hours: probed again
    fresh = Probe(HANGS)
    resolve_accel("auto", IMAGE, cache_path=cache, probe=fresh, key="f")
    resolve_accel("auto", IMAGE, cache_path=cache, probe=fresh, key="f", ttl=3600)
    assert fresh.calls == 1  # a recent failure is believed
    old_ok = Probe(KvmVerdict(True, "ready in 1 s", NOW - 30 * 86400, 1.0))
    resolve_accel("auto", IMAGE, cache_path=cache, probe=old_ok, key="k")
    assert resolve_accel("auto", IMAGE, cache_path=cache, probe=old_ok, key="k").cached
    assert old_ok.calls == 1
