"""The one size grammar (harness.units): what it reads, what it refuses and the hint it gives."""

from __future__ import annotations

import pytest

from harness.units import SizeError, format_size, parse_size

HINT_BYTES = (
    "sizes take K/KiB, M/MiB, G/GiB, T/TiB (binary: 1M = 1024 KiB); a bare number means bytes"
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("64MiB", 64 << 20),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("64mib", 64 << 20),
        ("1 GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("2T", 2 << 40),
        ("8k", 8192),
        ("4096", 4096),
        ("4096B", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes_are_binary(text: object, value: int) -> None:
    assert parse_size(text) == value


def test_a_bare_number_means_the_fields_unit() -> None:
    assert parse_size(256, bare="MiB") == 256 << 20
    assert parse_size("256", bare="MiB") == 256 << 20
    assert parse_size("1GiB", bare="MiB") == 1 << 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("64MB", "'64MB': MB is a decimal unit; write 64MiB (or 64M) for the binary size"),
        ("64 kb", "'64 kb': kb is a decimal unit; write 64KiB (or 64K) for the binary size"),
        ("1GB", "'1GB': GB is a decimal unit; write 1GiB (or 1G) for the binary size"),
        ("64 parsecs", "expected a size like 64MiB, got '64 parsecs'"),
        ("64Q", "'64Q': unknown unit 'Q'"),
        ("1.3", "'1.3' is not a whole number of bytes"),
        ("x", "expected a size like 64MiB, got 'x'"),
        ("-5M", "expected a size like 64MiB, got '-5M'"),
        (-5, "size -5 is negative"),
        (True, "expected a size like 64MiB, got True"),
        (1.5, "expected a size like 64MiB, got 1.5"),
        (None, "expected a size like 64MiB, got nothing"),
        ("9" * 40 + "M", "expected a size like 64MiB, got '" + "9" * 40 + "M'"),
        ("\u0663M", "expected a size like 64MiB, got '\u0663M'"),  # an Arabic-Indic digit
    ],
)
def test_size_errors_say_what_is_accepted(text: object, message: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert (info.value.message, info.value.hint) == (message, HINT_BYTES)


def test_the_hint_names_the_bare_unit() -> None:
    with pytest.raises(SizeError) as info:
        parse_size("lots", bare="MiB", what="memory size")
    assert info.value.message == "expected a memory size like 64MiB, got 'lots'"
    assert info.value.hint is not None and info.value.hint.endswith("a bare number means MiB")


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (240 << 20, "240 MiB"),
        (1 << 30, "1 GiB"),
        (1 << 40, "1 TiB"),
        (12 << 10, "12 KiB"),
        (267386880, "255 MiB"),
        (50769920, "48.4 MiB"),
        (1000, "1000 B"),
        (None, "-"),
    ],
)
def test_format_size(n: int | None, shown: str) -> None:
    assert format_size(n) == shown
