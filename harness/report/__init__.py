"""Results of one run (results/<run-id>/): run.json, samples.csv, guests.csv, PNG plots and
report.md, all re-renderable from the first three (`ksmh report DIR`)."""
