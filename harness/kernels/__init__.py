"""The kernel matrix: the differential scenarios on other kernels, booted as guests.

Modules: guest (the scenario runner against a guest's own KSM, over the agent channel),
machine (boot one guest of a given installed kernel), detect (which ksm_model profile a
kernel's files and behaviour say it is), matrix (run every kernel, write matrix.json and
matrix.md), compare (two matrix runs), cli (`ksmh kernels check|list`).
"""
