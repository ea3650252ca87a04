"""Fleets of hosts: inventory files, SSH sessions with checked host keys, check, prepare, run.

`harness.remote.fleet.on_fleet` is the one way to do something on every host: it runs a
function per host in parallel and returns a per-host outcome, never hiding a partial failure.
"""
