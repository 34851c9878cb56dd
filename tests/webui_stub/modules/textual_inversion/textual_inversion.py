"""Stub of modules/textual_inversion/textual_inversion.py (WebUI v1.10.1): the ``Embedding`` record only."""


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec  # a [vectors, width] tensor, or SDXL's {"clip_l": ..., "clip_g": ...}
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.filename = None
        self.hash = None
        self.shorthash = None
