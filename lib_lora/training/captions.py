"""Captions: read from their files, and varied per sample the way kohya-ss/sd-scripts does."""
from __future__ import annotations

import codecs
import random
from pathlib import Path
from typing import TYPE_CHECKING

from .problems import DatasetError

if TYPE_CHECKING:  # for the hints only: dataset.py imports this module
    from .dataset import DatasetConfig

CAPTION_EXTENSIONS = (".txt", ".caption")


def read_caption(path: Path) -> str:
    """First non-blank line of a UTF-8 caption file (kohya also uses one line); '' if blank."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read caption ({e.strerror or e})", path, "unreadable") from None
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # Windows Notepad adds a BOM
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        pos = e.start + skip
        raise DatasetError(f"{path}: caption is not valid UTF-8 (byte 0x{raw[pos]:02x} at byte position {pos}); "
                           "re-save it as UTF-8", path, "encoding") from None
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def process_caption(caption: str, config: DatasetConfig, rng: random.Random, epoch: int) -> str:
    """Caption dropout, shuffle with kept tokens, and tag dropout, with kohya semantics.

    * whole-caption dropout: probability ``caption_dropout_rate``, and every
      ``caption_dropout_every_n_epochs``-th epoch (counted from 1, as kohya does,
      so with n=2 the 0-based epochs 1, 3, 5... train uncaptioned);
    * ``keep_tokens_separator`` in the caption splits it into a fixed head, a
      shuffled middle and (if it appears twice) a fixed tail; otherwise the first
      ``keep_tokens`` separator-split tags stay in front;
    * tag dropout drops each non-kept tag with probability ``caption_tag_dropout_rate``.
    """
    if config.caption_dropout_rate > 0 and rng.random() < config.caption_dropout_rate:
        return ""
    n = config.caption_dropout_every_n_epochs
    if n > 0 and (epoch + 1) % n == 0:
        return ""
    if not (config.shuffle_caption or config.caption_tag_dropout_rate > 0):
        return caption

    sep = config.caption_separator

    def tags(text: str) -> list[str]:
        return [t.strip() for t in text.split(sep) if t.strip()]

    kts = config.keep_tokens_separator
    if kts and kts in caption:
        head, rest = caption.split(kts, 1)
        middle, _, tail = rest.partition(kts)
        fixed, flex, suffix = tags(head), tags(middle), tags(tail)
    else:
        all_tags = tags(caption)
        fixed, flex, suffix = all_tags[:config.keep_tokens], all_tags[config.keep_tokens:], []
    if config.shuffle_caption:
        rng.shuffle(flex)
    if config.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= config.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)
