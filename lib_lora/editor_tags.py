"""The notes editor's training tags: the tags a file was trained on as the editor lists them, one
clicked tag added to or taken out of the activation text, and a random prompt drawn from them.
Host-independent; ``hosts/webui_cards.py`` shows them in the WebUI's notes editor."""
from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .metadata import tag_frequency
from .params import literal_caption

# captions whose "tags" average this many characters are sentences: the editor lists their words
SENTENCE_TAG_LENGTH = 16
MIN_WORD_LENGTH = 3
_WORD = re.compile(r"[\w'-]+")


def editor_tags(meta: Mapping[str, Any]) -> list[tuple[str, int]]:
    """``ss_tag_frequency`` summed over the dataset folders, most frequent first; for sentence captions,
    their words of three or more characters instead, each with the summed count of the captions it is in."""
    tags = tag_frequency(meta)
    if not tags or sum(len(t) for t, _ in tags) / len(tags) < SENTENCE_TAG_LENGTH:
        return tags
    words: dict[str, int] = {}
    for caption, n in tags:
        for word in _WORD.findall(caption):
            if len(word) >= MIN_WORD_LENGTH:
                words[word] = words.get(word, 0) + n
    return sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))


def toggle_tag(text: str, tag: str) -> str:
    """The activation text with ``tag`` taken out if it is one of its comma-separated parts (empty
    parts dropped too), else added at the end."""
    parts = [p.strip() for p in text.split(",")]
    if tag in parts:
        return ", ".join(p for p in parts if p and p != tag)
    kept = text.rstrip().rstrip(",").rstrip()
    return f"{kept}, {tag}" if kept else tag


def random_prompt(tags: Sequence[tuple[str, int]], rng: random.Random | None = None) -> str:
    """Each tag kept with probability count / the highest count (so the most frequent always),
    escaped to stay literal in the WebUI's prompt syntax, in alphabetical order."""
    rng = rng or random.Random()
    top = max((n for _, n in tags), default=0)
    if top <= 0:
        return ""
    picked = [literal_caption(t) for t, n in tags if rng.random() * top < n]
    return ", ".join(sorted(picked))
