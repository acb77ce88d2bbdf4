"""Measurement: the neighbour index, kNN, linear probe, retrieval metrics, open-set scores, the kNN monitor."""
