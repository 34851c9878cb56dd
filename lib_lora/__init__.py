"""LoRA Workshop core: adapter files, key maps, patching and training, with no WebUI imports."""
__version__ = "0.1.0"
