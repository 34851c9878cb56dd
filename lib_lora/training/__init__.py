"""LoRA training: datasets, buckets and (elsewhere) the training loop. No WebUI imports."""
