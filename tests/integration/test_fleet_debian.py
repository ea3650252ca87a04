"""The Debian image kind (mmdebstrap + systemd) boots the same way and runs the same agent.

Built only when asked: the test builds it if mmdebstrap is installed (about 30 s), and skips
otherwise. mem-merge off, so no KSM lock is needed.
"""

from __future__ import annotations

import shutil

import pytest

from harness.guests.debian_image import default_debian_dir, ensure_debian_image
from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec
from harness.kinds import AccelKind, ImageKind

# long: a systemd guest boots in ~80 s under TCG: `make test-long` (nightly), not the CI.
pytestmark = [pytest.mark.qemu, pytest.mark.long]


def test_debian_guest_boots_systemd_and_runs_the_agent() -> None:
    built = (default_debian_dir() / "manifest.json").exists()
    if shutil.which("mmdebstrap") is None and not built:
        pytest.skip("Debian image not built and mmdebstrap missing (make -C guest-images debian)")
    image = ensure_debian_image()
    assert image.kind == "debian" and image.disk is not None
    with Fleet(
        FleetSpec(
            1, 256, image=ImageKind.DEBIAN, accel=AccelKind.TCG, mem_merge=False, ready_timeout=240
        ),
        image=image,
    ) as fleet:
        [name] = fleet.pids()
        assert fleet.fill("a", "16M", "random:5").raise_if_failed()
        assert fleet.verify("a").field("mismatched") == {name: 0}
        log = fleet.guests[0].spec.console_log.read_text(errors="replace")
        assert "ksmh-init: switching to /dev/vda" in log
        assert "ksmh-agent.service" in log  # started by systemd, not by our init
    assert not fleet.run_dir.exists()
