"""The model beside the real kernel, live and ahead of time.

- calibration: ksmd's CPU cost per page visit on this host (measured by `ksmh calibrate`);
- timeline: a model's ksmd run batch by batch on that cost, in wall time;
- forecast: what KSM would save, how fast and at what CPU cost, before it is turned on;
- live: the exporter's twin (`ksmh export --twin`), a model in lockstep with the kernel, and
  what-if twins over the same captures.
"""
