"""The CLI's host: single-file Stable Diffusion checkpoints held as the WebUI's own module classes."""
