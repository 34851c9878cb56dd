"""An exponential moving average (EMA) of the LoRA being trained (``ema_decay``).

The optimiser keeps updating the LoRA's own weights; beside them an fp32 copy follows their moving
average, one ``lerp`` per step over the optimiser's tensors (the UNet's LoRA is one flat tensor,
flat_params.py; the text encoders' are a handful).  What a run hands out is the average: every LoRA
file it saves and every sample it renders (``applied``), so that what was sampled is what was
saved.  The resume state keeps both, the weights to go on training and the average to go on
averaging, so a resumed run continues exactly.

Averaging starts at the run's first step with the zero-debiased form of Adam's bias correction
(Kingma & Ba 2015, section 3; TensorFlow's ``assign_moving_average(zero_debias=True)``): after
``t`` updates the average is ``sum_i d^(t-i) (1-d) w_i / (1 - d^t)``, a weighted mean of the
weights seen so far with nothing of the initial LoRA in it.  It is kept directly as that mean, so
update ``t`` uses the decay ``d (1 - d^(t-1)) / (1 - d^t)``: 0 at the first (the average is the
weights), approaching ``d`` after some ``1 / (1 - d)`` steps.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from .network import TrainingNetwork


def decay_at(decay: float, t: int) -> float:
    """The decay of update ``t`` (1 for the first): the debiased average's, see the module's docstring."""
    if t < 1:
        raise ValueError(f"EMA updates are counted from 1 (got {t})")
    return decay * (1 - decay ** (t - 1)) / (1 - decay ** t)


class LoraEMA:
    """The moving average of ``tensors`` (the optimiser's: flat_params.params) at ``decay``."""

    def __init__(self, tensors: list[Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay must lie strictly between 0 and 1 (got {decay})")
        self.decay, self.tensors = decay, list(tensors)
        self.average = [t.detach().to(torch.float32, copy=True) for t in self.tensors]

    @torch.no_grad()
    def update(self, t: int) -> None:
        """Fold in the weights after update ``t`` of the run (its optimiser step, from 1)."""
        w = 1 - decay_at(self.decay, t)
        torch._foreach_lerp_(self.average, [x.detach().float() for x in self.tensors], w)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The network holds the average for the block, then its own weights again, bit for bit."""
        with torch.no_grad():
            own = [t.detach().clone() for t in self.tensors]
            for t, a in zip(self.tensors, self.average):
                t.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, o in zip(self.tensors, own):
                    t.copy_(o)

    def state_dict(self, net: TrainingNetwork) -> dict[str, Tensor]:
        """The average in kohya's keys, fp32 (what a state file keeps; independent of the tensors' layout)."""
        with self.applied():
            return net.kohya_state_dict(torch.float32)

    def load_state_dict(self, net: TrainingNetwork, sd: dict[str, Tensor]) -> None:
        """Take back what ``state_dict`` gave; ``net``'s own weights are left as they are."""
        with self.applied():
            net.load_kohya_state_dict(sd)
            with torch.no_grad():
                for a, t in zip(self.average, self.tensors):
                    a.copy_(t)

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average over from the weights as they are (a resumed run that did not average)."""
        for a, t in zip(self.average, self.tensors):
            a.copy_(t)
