"""The grammars of the twin and forecast options (harness.twin.knobs): exact values, exact
errors, nothing half-parsed."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.twin.knobs import knob_set, show, what_if
from harness.units import duration, share


def test_knob_sets_are_checked_like_ksmh_set_and_come_in_write_order() -> None:
    assert knob_set("sleep_millisecs=20, pages_to_scan=1000") == {
        "pages_to_scan": 1000,
        "sleep_millisecs": 20,
    }
    assert knob_set("use_zero_pages=yes,max_page_sharing=16") == {
        "max_page_sharing": 16,
        "use_zero_pages": 1,
    }
    assert show({"pages_to_scan": 1000, "sleep_millisecs": 20}) == (
        "pages_to_scan=1000,sleep_millisecs=20"
    )
    assert show({}) == "(current)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pages_to_scan", "'pages_to_scan': expected KNOB=VALUE[,KNOB=VALUE...], got "
         "'pages_to_scan'"),
        ("a=1,,b=2", "'a=1,,b=2': expected KNOB=VALUE[,KNOB=VALUE...], got ''"),
        ("run=1", "'run=1': run is not a knob to compare"),
        ("max_page_sharing=1", "'max_page_sharing=1': max_page_sharing: 1 is out of range "
         "2..2147483647"),
        ("pages_to_scan=1,pages_to_scan=2", "'pages_to_scan=1,pages_to_scan=2': pages_to_scan "
         "is given twice"),
        ("bogus=1", "'bogus=1': unknown KSM tunable 'bogus'"),
    ],
)  # fmt: skip
def test_bad_knob_sets(text: str, message: str) -> None:
    with pytest.raises(HarnessError) as exc:
        knob_set(text)
    assert exc.value.message == message


def test_what_if_names_and_allowed_knobs() -> None:
    assert what_if("mps16:max_page_sharing=16") == ("mps16", {"max_page_sharing": 16})
    assert what_if("fast.1:pages_to_scan=4000,sleep_millisecs=10") == (
        "fast.1",
        {"pages_to_scan": 4000, "sleep_millisecs": 10},
    )
    with pytest.raises(HarnessError) as exc:
        what_if("max_page_sharing=16")
    assert exc.value.message == (
        "--what-if 'max_page_sharing=16': expected NAME:KNOB=VALUE[,KNOB=VALUE...]"
    )
    with pytest.raises(HarnessError) as exc:
        what_if("a b:max_page_sharing=16")
    assert "NAME is 1-32 letters" in str(exc.value.hint)
    with pytest.raises(HarnessError) as exc:
        what_if("adv:advisor_mode=scan-time")
    assert exc.value.message == "'advisor_mode=scan-time': advisor_mode cannot be varied here"
    assert exc.value.hint is not None and "max_page_sharing" in exc.value.hint


def test_shares_and_durations() -> None:
    assert share("95%") == 0.95 and share("0.5") == 0.5 and share("100%") == 1.0
    for bad in ("0", "0%", "101%", "1.5", "x", "nan", "-5%"):
        with pytest.raises(HarnessError, match=r"expected a share like 95% or 0\.95"):
            share(bad)
    assert duration("10m") == 600 and duration("90s") == 90 and duration("1h30m") == 5400
    assert duration("2.5") == 2.5 and duration("1m30s") == 90
    for bad in ("", "0", "10x", "-1", "m", "inf", "nan"):
        with pytest.raises(HarnessError, match="expected a duration like 90s, 10m or 1h30m"):
            duration(bad)
