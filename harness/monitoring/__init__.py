"""Monitoring for KSM fleets: Prometheus file_sd config, recording and alert rules, dashboard."""
