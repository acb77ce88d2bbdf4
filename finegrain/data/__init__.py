"""Data: manifests (schema, importers, validation), image decoding, views, datasets, cache."""
