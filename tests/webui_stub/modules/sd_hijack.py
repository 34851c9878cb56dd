"""Stub of modules/sd_hijack.py (WebUI v1.10.1): only the comment channel of ``model_hijack``.

processing.process_images_inner copies ``model_hijack.comments`` into ``p.comment()`` after
extra networks are activated.
"""


class StableDiffusionModelHijack:
    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
