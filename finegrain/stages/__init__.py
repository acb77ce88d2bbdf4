"""Stages: plain functions `run_<stage>(config) -> Artifact`."""
