"""Curating a photo collection from its embeddings: audit (label errors, twins, outliers), suggest (what to label)."""
