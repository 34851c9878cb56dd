"""What can be wrong with a training dataset: raised (``DatasetError``) or collected (``Problem``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal


class DatasetError(ValueError):
    """A dataset or config problem; the message names the file or folder at fault."""

    def __init__(self, message: str, path: str | Path | None = None, kind: str = "error") -> None:
        super().__init__(message)
        self.path = str(path) if path is not None else None
        self.kind = kind


@dataclass(frozen=True)
class Problem:
    severity: Literal["error", "warning"]
    kind: str  # config, missing_dir, empty, no_prefix, zero_repeats, unreadable, too_large, too_small,
    #            encoding, empty_caption, no_caption_text, stray_images, no_reg, unused_reg, upscaled
    message: str
    path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
