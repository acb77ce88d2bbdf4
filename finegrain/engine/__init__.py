"""The one training loop shared by every training stage, and what it needs (device, sampler, checkpoint)."""
