"""Playbooks: the validated YAML format (schema.py, load.py, expect.py) and the comparison
runner (runner.py, steps.py, modelside.py, live.py) behind `ksmh run`."""
