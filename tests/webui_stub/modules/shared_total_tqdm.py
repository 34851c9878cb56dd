"""Stub of modules/shared_total_tqdm.py (WebUI v1.10.1): the console's "Total progress" bar.

The sampler calls ``update()`` once per step, which opens the bar when none is open; whoever ran
``process_images`` closes it with ``clear()`` (txt2img, img2img and the API do).  Nothing is
printed here: ``_tqdm`` only counts.
"""
import types

from modules import shared


class TotalTQDM:
    def __init__(self):
        self._tqdm = None

    def reset(self):
        self._tqdm = types.SimpleNamespace(n=0, total=shared.state.job_count * shared.state.sampling_steps)

    def update(self):
        if self._tqdm is None:
            self.reset()
        self._tqdm.n += 1

    def updateTotal(self, new_total):
        if self._tqdm is None:
            self.reset()
        self._tqdm.total = new_total

    def clear(self):
        self._tqdm = None
