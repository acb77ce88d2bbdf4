"""Features of photos as a model reads them: batched extraction, .npy feature files and the shared cache."""
