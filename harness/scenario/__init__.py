"""Scenario runner: one KSM workload on the real kernel and on ksm_model, counters compared.

Modules: spec (the Scenario value), tokens (page contents), worker (the child process that
holds a buffer), kernel_runner / model_runner (one Series each), compare (diff of two series,
run_both), generate (seeded random scenarios). Kept import-light: the worker child imports
this package too.
"""
