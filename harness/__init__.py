"""ksm-harness: drive Kernel Samepage Merging on fleets of guests and compare it with a model."""

__version__ = "0.1.0"
