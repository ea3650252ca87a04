"""Errors of the scenario package (all HarnessError subclasses, message + hint)."""

from __future__ import annotations

from harness.errors import HarnessError


class ScenarioError(HarnessError):
    """A scenario description is invalid; the message names the offending field."""


class WorkerError(HarnessError):
    """A worker child process failed, answered an error, or did not answer in time."""


class SamplingError(HarnessError):
    """A counter sample could not be taken at the end of a full scan, so it would be wrong."""


class ForeignKsmActivity(HarnessError):
    """Some process outside the scenario is registered with KSM, so the counters are not ours."""


class ModelUnavailable(HarnessError):
    """The ksm_model package cannot be imported or lacks the API the runner needs."""
