"""anomaly-pipeline: the library the DVC stages share."""
