"""Evaluation: feature extraction, kNN, linear probe, retrieval metrics, plots and report."""
