"""Prefect deployment definitions (names, parameters, schedules) of `skinsense-pipeline`."""
