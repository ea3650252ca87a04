"""matrix.json / matrix.md, `ksmh compare` of two matrices, and `ksmh kernels` bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.guests.image import installed_kernels
from harness.kernels.matrix import (
    KernelRow,
    Mismatch,
    guest_model_options,
    resolve_kernels,
    scenario_set,
)
from harness.kernels.report import read_matrix, write_matrix
from harness.pytest_plugin import require
from harness.scenario.examples import worked_examples
from harness.scenario.generate import generate


def rows(exact_61: int = 40, mismatch: bool = False) -> list[KernelRow]:
    a = KernelRow("6.1.0-57-amd64", "guest", "6.1", scenarios=40, exact=exact_61, seconds=31.4)
    a.boot_seconds = 9.6
    if mismatch:
        a.mismatches.append(Mismatch("random-7", 7, 3, "end", "pages_sharing", 1, 2))
    b = KernelRow("6.18.44-fc-v782", "host", "6.17", scenarios=40, exact=40, seconds=20.0)
    return [a, b]


def test_matrix_json_has_the_issue_shape(tmp_path: Path) -> None:
    write_matrix(tmp_path, rows(39, mismatch=True), {"seeds": 24, "seed_start": 0})
    doc = json.loads((tmp_path / "matrix.json").read_text())
    k = doc["kernels"][0]
    assert {k2: k[k2] for k2 in ("release", "profile", "scenarios", "exact")} == {
        "release": "6.1.0-57-amd64", "profile": "6.1", "scenarios": 40, "exact": 39,
    }  # fmt: skip
    assert k["mismatches"] == [
        {"scenario": "random-7", "seed": 7, "full_scans": 3, "phase": "end",
         "counter": "pages_sharing", "kernel": 1, "model": 2},
    ]  # fmt: skip
    md = (tmp_path / "matrix.md").read_text()
    assert "| 6.1.0-57-amd64 | guest | 6.1 | 40 | 39 | 31 | 9.6 |" in md
    assert "| random-7 | 7 | 3 | end | pages_sharing | 1 | 2 |" in md
    assert read_matrix(tmp_path)["kernels"][1]["where"] == "host"


def test_an_error_row_and_an_error_scenario(tmp_path: Path) -> None:
    r = [KernelRow("6.12.117+deb12-amd64", "guest", error="guest did not boot")]
    r.append(KernelRow("6.1.0-57-amd64", "guest", "6.1", scenarios=2, exact=1))
    r[1].mismatches.append(Mismatch("example-7", None, error="ksmd went on"))
    write_matrix(tmp_path, r, {})
    md = (tmp_path / "matrix.md").read_text()
    assert "| 6.12.117+deb12-amd64 | guest | - | 0 | ERROR |" in md
    assert "guest did not boot" in md and "| example-7 | - | | error | ksmd went on | | |" in md
    assert not r[0].ok and not r[1].ok


def test_compare_two_matrices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_matrix(a, rows(40), {})
    write_matrix(b, rows(39, mismatch=True), {})
    assert main(["compare", str(a), str(b / "matrix.json")]) == 1  # B lost an exact scenario
    out = capsys.readouterr().out
    assert "| 6.1.0-57-amd64 | 6.1 | 40/40 | 39/40 | 1 | 0 |" in out
    assert "new mismatch in random-7" in out
    assert main(["compare", str(b), str(a)]) == 0  # better: fixed, nothing new
    assert "now exact: random-7" in capsys.readouterr().out
    assert main(["compare", str(a), str(a)]) == 0


def test_compare_refuses_what_is_not_a_matrix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "matrix.json").write_text('{"kernels": [{"release": "x"}]}')
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "lacks release/scenarios/exact" in capsys.readouterr().err


def test_scenario_set_is_the_examples_then_the_seeds() -> None:
    s = scenario_set(3, 10)
    assert len(s) == len(worked_examples()) + 3
    assert [x.seed for x in s[-3:]] == [10, 11, 12]
    assert s[0].name == "example-1"
    # THP processes included, as in the host differential tests (a third of the seeds).
    assert [x.name for x in s[-3:]] == [generate(seed).name for seed in (10, 11, 12)]
    assert any(p.thp for x in scenario_set(12) for p in x.processes)


def test_a_guest_model_takes_the_guest_thp_and_the_config_of_its_release(tmp_path: Path) -> None:
    """CONFIG_HZ / CONFIG_PT_RECLAIM from /boot/config-RELEASE on the host (the package the
    guest boots), THP as the guest shows it."""
    releases = [r for r in installed_kernels() if (Path("/boot") / f"config-{r}").exists()]
    if not releases:
        require("qemu", "no /boot/config-RELEASE of an installed Debian guest kernel "
                "(scripts/bootstrap.sh installs linux-image-amd64)")  # fmt: skip
    text = (Path("/boot") / f"config-{releases[0]}").read_text()
    hz = int(next(x for x in text.splitlines() if x.startswith("CONFIG_HZ=")).split("=")[1])
    got = guest_model_options(releases[0], "always", False)
    assert got == {"hz": hz, "pt_reclaim": "CONFIG_PT_RECLAIM=y" in text.splitlines(),
                   "thp": "always", "thp_use_zero_page": False}  # fmt: skip
    assert guest_model_options("0.0.0-none", "never", True)["hz"] == 250  # no config: default


def test_unknown_kernel_and_bad_seeds_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(HarnessError, match="no such installed kernel") as exc:
        resolve_kernels(["9.9"])
    assert exc.value.hint is not None and "apt-get install linux-image-9.9" in exc.value.hint
    assert main(["kernels", "check", "--kernel", "9.9", "--seeds", "0"]) == 2
    assert "--kernel 9.9: no such installed kernel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["kernels", "check", "--seeds", "-1"])
    assert stop.value.code == 2
    assert "expected an integer >= 0" in capsys.readouterr().err
    assert resolve_kernels(["host", "host"]) == ["host"]


def test_a_release_prefix_ends_at_a_separator(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--kernel 6.1` is the 6.1 kernel, never 6.12 (it once checked 6.12 instead)."""
    import harness.guests.image as image

    both = ["6.1.0-57-amd64", "6.12.117+deb12-amd64"]
    monkeypatch.setattr(image, "installed_kernels", lambda: both)
    assert resolve_kernels(["6.1"]) == ["6.1.0-57-amd64"]
    assert resolve_kernels(["6.12"]) == ["6.12.117+deb12-amd64"]
    assert resolve_kernels(["6.1.0"]) == ["6.1.0-57-amd64"]
    assert resolve_kernels(["6"]) == ["6.12.117+deb12-amd64"]  # the newest of the series
    with pytest.raises(HarnessError, match=r"--kernel 6\.1\.0-5: no such installed kernel"):
        resolve_kernels(["6.1.0-5"])
