"""Jobs, schedules, sensors and the single Dagster entry point (``jobs.definitions``)."""
