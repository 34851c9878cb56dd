"""TensorBoard logging of a run (kohya's ``--log_with tensorboard --logging_dir DIR``), as trainer callbacks.

It writes through the real ``tensorboard`` package (``torch.utils.tensorboard``), which is never
installed for you: the option is refused up front when it is missing (checks.check_logging).  Events
go where sd-scripts puts them, ``LOGGING_DIR/<log_prefix><YYYYmmddHHMMSS>/network_train``, under
sd-scripts' tags: ``loss/current`` and ``loss/average`` every step, ``lr/unet`` and ``lr/textencoder``
for the parts that train, ``loss/epoch_average`` at each finished epoch (its x is the epoch), and
the sample images as ``samples/00``, ``samples/01``… at their step.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

# the network's parameter groups (network.py) -> sd-scripts' lr tags
_LR_TAGS = {"unet": "lr/unet", "text_encoder": "lr/textencoder"}
RUN_NAME = "network_train"  # sd-scripts' tracker name: the folder inside the timestamped one


def wanted(cfg: Any) -> bool:
    """kohya's rule: ``log_with tensorboard``, or a ``logging_dir`` without ``log_with``."""
    return cfg.log_with == "tensorboard" or (cfg.log_with is None and bool(cfg.logging_dir))


class TensorBoardLog:
    """One run's event file; ``updates_per_epoch`` tells where epochs end."""

    def __init__(self, cfg: Any, updates_per_epoch: int, when: float | None = None):
        from torch.utils.tensorboard import SummaryWriter

        stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(when))
        self.folder = Path(cfg.logging_dir) / f"{cfg.log_prefix}{stamp}" / RUN_NAME
        self.writer = SummaryWriter(str(self.folder))
        self.per_epoch = max(1, updates_per_epoch)
        self._epoch_losses: list[float] = []

    def progress(self, p: Any) -> None:
        """After each optimiser step (a trainer ``Progress``)."""
        w = self.writer
        w.add_scalar("loss/current", p.loss, p.step)
        w.add_scalar("loss/average", p.avg_loss, p.step)
        for name, lr in p.lrs.items():
            w.add_scalar(_LR_TAGS.get(name, f"lr/{name}"), lr, p.step)
        self._epoch_losses.append(p.loss)
        if p.step % self.per_epoch == 0:  # the step that ends an epoch
            w.add_scalar("loss/epoch_average", sum(self._epoch_losses) / len(self._epoch_losses),
                         p.step // self.per_epoch)
            self._epoch_losses = []

    def samples(self, step: int, images: list) -> None:
        for i, img in enumerate(images):
            self.writer.add_image(f"samples/{i:02d}", np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def wrap(self, callbacks: Any) -> Any:
        """``callbacks`` (trainer.Callbacks) with this log fed first."""
        def on_progress(p: Any) -> None:
            self.progress(p)
            if callbacks.on_progress:
                callbacks.on_progress(p)

        def on_samples(step: int, images: list) -> None:
            self.samples(step, images)
            if callbacks.on_samples:
                callbacks.on_samples(step, images)

        return dataclasses.replace(callbacks, on_progress=on_progress, on_samples=on_samples)

    def close(self) -> None:
        self.writer.close()
