"""The expectation language: parsing, and verdicts against given values."""

from __future__ import annotations

import pytest

from harness.playbook.expect import Context, ExpectationSyntax, parse_expectation

KERNEL = {"pages_shared": 256, "pages_sharing": 65280, "saved_bytes": 65280 * 4096, "full_scans": 9}
MODEL = {"pages_shared": 256, "pages_sharing": 65000, "saved_bytes": 65000 * 4096, "full_scans": 9}
START = {"kernel": {"pages_sharing": 1000}, "model": {"pages_sharing": 0}}


def ctx(primary: str = "kernel", verify: dict[str, int | str] | None = None) -> Context:
    values = {"kernel": KERNEL, "model": MODEL, "host": {"mem_available": 2 << 30}}
    if primary == "model":
        values = {"model": MODEL, "host": {}}
    return Context(values=values, start=START, primary=primary, verify=verify)


@pytest.mark.parametrize(
    ("text", "status", "detail"),
    [
        ("pages_sharing >= 0.995 * model", "passed", "65280 >= 64675"),
        ("pages_sharing >= 1.01 * model", "failed", "65280 >= 65650"),
        ("model.pages_shared == 256", "passed", "256 == 256"),
        ("saved_bytes >= 255MiB", "passed", "255 MiB >= 255 MiB"),
        ("saved_bytes >= 255m", "passed", "255 MiB >= 255 MiB"),
        ("saved_bytes >= 0.25G", "failed", "255 MiB >= 256 MiB"),
        ("saved_bytes > 255MiB", "failed", "255 MiB > 255 MiB"),
        ("saved_bytes > 267386880", "failed", "255 MiB > 255 MiB"),
        ("delta.pages_sharing == 64280", "passed", "64280 == 64280"),
        ("model.delta.pages_sharing < 65001", "passed", "65000 < 65001"),
        ("pages_sharing != kernel", "failed", "65280 != 65280"),
        ("mem_available >= 1GiB", "passed", "2 GiB >= 1 GiB"),
        ("mem_available_min >= 1GiB", "skipped", "no value for host.mem_available_min in this run"),
        ("ksm_zero_pages == 0", "skipped", "no value for kernel.ksm_zero_pages in this run"),
        (
            "kernel == model: pages_shared, full_scans",
            "passed",
            "kernel/model: pages_shared 256/256, full_scans 9/9",
        ),
        (
            "kernel == model: pages_sharing",
            "failed",
            "kernel/model: pages_sharing 65280/65000; differ: pages_sharing",
        ),
        (
            "kernel ~= model within 0.5%: pages_sharing",
            "passed",
            "kernel/model: pages_sharing 65280/65000",
        ),
        (
            "kernel ~= model within 0.4%: pages_sharing",
            "failed",
            "kernel/model: pages_sharing 65280/65000; differ: pages_sharing",
        ),
    ],
)
def test_verdicts(text: str, status: str, detail: str) -> None:
    v = parse_expectation(text).evaluate(ctx())
    assert (v.status, v.detail) == (status, detail)


def test_model_only_run_skips_kernel_comparisons() -> None:
    v = parse_expectation("kernel == model: pages_shared").evaluate(ctx("model"))
    assert (v.status, v.detail) == ("skipped", "pages_shared: no kernel value in this run")
    # Unprefixed names mean the model there.
    v = parse_expectation("pages_sharing == 65000").evaluate(ctx("model"))
    assert v.status == "passed"


@pytest.mark.parametrize(
    ("verify", "status", "detail"),
    [
        ({"g0": 0, "g1": 0}, "passed", "2 guests, 0 mismatched bytes"),
        ({"g0": 0, "g1": 17}, "failed", "g1: 17"),
        (None, "failed", "no verify step ran before this expectation in the phase"),
    ],
)
def test_verify_clean(verify: dict[str, int | str] | None, status: str, detail: str) -> None:
    v = parse_expectation("verify: clean").evaluate(ctx(verify=verify))
    assert (v.status, v.detail) == (status, detail)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pages_merged >= 1", "unknown quantity 'pages_merged'"),
        ("pages_sharing >>= 5", "cannot read '>= 5' as a value"),
        (
            "5 <= pages_sharing",
            "the left side of '5 <= pages_sharing' must name a quantity, not a constant",
        ),
        ("kernel ~= model: pages_shared", "~= needs a tolerance"),
        ("kernel == model: pages_shard", "unknown counter 'pages_shard'"),
        ("verify: dirty", "verify accepts only 'clean'"),
        ("pages_sharing", "cannot read expectation 'pages_sharing'"),
        ("pages_sharing >= model.", "cannot read 'model.' as a value"),
        (
            "kernel ~= model within 1.2.3%: pages_sharing",
            "cannot read expectation 'kernel ~= model within 1.2.3%: pages_sharing'",
        ),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(ExpectationSyntax) as info:
        parse_expectation(text)
    assert str(info.value) == message


def test_fractional_values_are_shown_with_two_decimals() -> None:
    v = parse_expectation("pages_sharing >= 0.95 * model").evaluate(ctx())
    assert v.detail == "65280 >= 61750"
    v = parse_expectation("pages_shared >= 0.999 * model").evaluate(ctx())
    assert v.detail == "256 >= 255.74"


def test_negative_and_percent_constants() -> None:
    e = parse_expectation("delta.pages_sharing <= -500")
    assert e.rhs is not None and e.rhs.factor == -500.0
    e = parse_expectation("sharing_ratio >= 50%")
    assert e.rhs is not None and e.rhs.factor == 0.5


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        (
            "saved_bytes >= 240MB",
            "MB is a decimal unit; write MiB (or M) for the binary size",
            "sizes take K/KiB, M/MiB, G/GiB, T/TiB (binary: 1M = 1024 KiB); "
            "a bare number means bytes",
        ),
        (
            "saved_bytes >= 240XB",
            "unknown unit 'XB'",
            "sizes take K/KiB, M/MiB, G/GiB, T/TiB (binary: 1M = 1024 KiB); "
            "a bare number means bytes",
        ),
        (
            "pages_sharing >= " + "1" * 500,
            "an expectation of 517 characters is too long (at most 400)",
            "split it into several expectations",
        ),
    ],
)
def test_size_errors_in_expectations(text: str, message: str, hint: str) -> None:
    with pytest.raises(ExpectationSyntax) as info:
        parse_expectation(text)
    assert (str(info.value), info.value.hint) == (message, hint)
