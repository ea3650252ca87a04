"""One FleetSpec from each place that asks for a fleet: a playbook, `ksmh fleet up`, the runner.

Each test states the whole spec, so a field a mapping forgets (or invents) shows up here.
"""

from __future__ import annotations

import argparse

import pytest

from harness.guests import cli
from harness.guests.fleet import Fleet
from harness.guests.spec import FleetSpec
from harness.kinds import AccelKind, GuestBackendKind, ImageKind
from harness.playbook.runner import default_fleet
from harness.playbook.schema import loads_playbook

PLAYBOOK = """
name: spec
fleet: {count: 2, memory_mib: 192, image: debian, backend: libvirt, accel: tcg, vcpus: 2, mem_merge: false}
phases:
  - name: p
    steps:
      - expect: ["pages_sharing >= 0"]
"""  # noqa: E501


def test_the_playbook_fleet_section_is_the_guests_fleet_spec() -> None:
    pb = loads_playbook(PLAYBOOK)
    assert pb.fleet == FleetSpec(
        count=2,
        memory_mib=192,
        image=ImageKind.DEBIAN,
        backend=GuestBackendKind.LIBVIRT,
        accel=AccelKind.TCG,
        vcpus=2,
        mem_merge=False,
        thp=True,  # the playbook default, as production runs guests (`thp: false` turns it off)
    )
    minimal = loads_playbook(PLAYBOOK.replace(PLAYBOOK.splitlines()[2], "fleet: {count: 1}"))
    assert minimal.fleet == FleetSpec(count=1, thp=True)


def test_the_runner_boots_exactly_the_playbook_spec() -> None:
    # Before, `image: debian` validated and the runner then refused it.
    spec = loads_playbook(PLAYBOOK.replace("backend: libvirt", "backend: qemu")).fleet
    fleet = default_fleet(spec)
    assert isinstance(fleet, Fleet)
    assert fleet.spec is spec


def parse_up(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ksmh")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["fleet", "up", *argv])


def test_fleet_up_options_map_to_one_spec() -> None:
    assert cli.spec_from_args(parse_up("--count", "3")) == FleetSpec(count=3)
    args = parse_up(
        "--count", "2", "--memory", "128", "--backend", "libvirt", "--uri", "qemu:///session",
        "--accel", "kvm", "--image", "debian", "--vcpus", "2", "--no-mem-merge", "--no-thp",
        "--concurrency", "1", "--ready-timeout", "60",
    )  # fmt: skip
    assert cli.spec_from_args(args) == FleetSpec(
        count=2,
        memory_mib=128,
        image=ImageKind.DEBIAN,
        backend=GuestBackendKind.LIBVIRT,
        uri="qemu:///session",
        accel=AccelKind.KVM,
        vcpus=2,
        mem_merge=False,
        thp=False,
        concurrency=1,
        ready_timeout=60.0,
    )


def test_fleet_up_choices_come_from_the_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_up("--count", "1", "--accel", "hvf")
    assert "invalid choice: 'hvf' (choose from 'auto', 'kvm', 'tcg')" in capsys.readouterr().err
