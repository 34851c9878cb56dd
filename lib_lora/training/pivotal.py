"""Pivotal tuning: the trigger word's own token embeddings, trained beside the LoRA and saved in its file.

``pivotal_word`` names a word of the captions.  Each text encoder tokenises it to n tokens (SDXL's two
encoders share CLIP's vocabulary; a word they split differently is refused) and gets n trainable vectors,
one per token position, started from those tokens' own embeddings.  While the run trains, a forward hook on
each encoder's token-embedding table puts them in place wherever the word's tokens occur in a row of ids:
before the WebUI's textual-inversion fixes, which rewrite that table's output.  Their own AdamW (no weight
decay, constant ``pivotal_lr``) steps after the LoRA's optimiser; after ``pivotal_steps`` they stay as they
are, and captions may be cached again.  Every save bundles them as the built-in Lora reads a textual
inversion bundled in a LoRA (``bundle_emb.WORD.string_to_param.*``; SDXL ``.clip_l`` and ``.clip_g``), so
wherever the file is active the word in a prompt stands for exactly the vectors it trained with.
The LoRA's moving average (``ema_decay``) does not cover them: a save holds them as trained.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..bundled import SDXL_PARTS, BundledEmbedding, bundle_tensors, token_table
from .half_weights import step_another
from .model import TrainableModel


def bundle_parts(family: str) -> list[str]:
    """How a bundled embedding names each text encoder's vectors, in the encoders' order."""
    return list(SDXL_PARTS) if family == "sdxl" else [""]


class PivotalWord:
    """One word's trainable vectors, per text encoder, and their optimiser."""

    def __init__(self, model: TrainableModel, word: str, lr: float, steps: int = 0,
                 start: BundledEmbedding | None = None):
        """``steps``: train for the first ``steps`` optimiser steps only (0: the whole run); ``start``: the
        vectors to start from (a file's bundled embedding of this word) instead of the tokens' own."""
        parts = bundle_parts(model.family)
        if model.family not in ("sd1", "sd2", "sdxl") or len(model.text_encoders) != len(parts):
            raise ValueError(f"pivotal tuning: a {model.family} model with {len(model.text_encoders)} text encoders "
                             "is not supported (SD1, SD2 and SDXL are)")
        if model.tokenize_word is None:
            raise ValueError("pivotal tuning: this host cannot say how its text encoders tokenise a word")
        ids = [list(map(int, i)) for i in model.tokenize_word(word)]
        if not ids or not ids[0]:
            raise ValueError(f"pivotal_word {word!r}: the text encoder makes no token of it")
        if any(i != ids[0] for i in ids):
            raise ValueError(f"pivotal_word {word!r}: SDXL's two text encoders tokenise it differently "
                             f"({ids[0]} and {ids[1]}); the WebUI places an embedding by the first's tokens")
        self.word, self.ids, self.until = word, ids[0], steps or None
        self.tables: list[tuple[str, nn.Embedding]] = []
        for part, (_, root) in zip(parts, model.text_encoders):
            table = token_table(root)
            if table is None:
                raise ValueError(f"pivotal tuning: no token-embedding table found in text encoder {part or 'te'}")
            self.tables.append((part, table))
        if start is not None:
            problem = start.misfit({p: t.weight.shape[1] for p, t in self.tables})
            if problem is None and start.count != len(self.ids):
                problem = (f"it has {start.count} vectors, and {word!r} is {len(self.ids)} tokens "
                           f"for this model's tokenizer")
            if problem:
                raise ValueError(f"pivotal_word {word!r}: cannot start from the file's embedding: {problem}")
        self.vectors: dict[str, nn.Parameter] = {}
        for part, table in self.tables:
            init = start.vectors[part] if start is not None else table.weight[self.ids]
            self.vectors[part] = nn.Parameter(init.detach().to(table.weight.device, torch.float32).clone())
        self.opt = torch.optim.AdamW(list(self.vectors.values()), lr=lr, weight_decay=0.0)

    @property
    def training(self) -> bool:
        """Whether the vectors still train (the captions' encoding then needs their gradients)."""
        return any(v.requires_grad for v in self.vectors.values())

    @contextmanager
    def placed(self) -> Iterator[None]:
        """The vectors in place of the word's tokens in every text encoder's token embeddings."""
        with ExitStack() as stack:
            for part, table in self.tables:
                h = table.register_forward_hook(_placing(self.ids, self.vectors[part]))
                stack.callback(h.remove)
            yield

    def step(self, step: int, scaler: Any) -> None:
        """After the LoRA's optimiser step ``step``, before the run's loss scaler updates: the vectors' own step
        through that scaler (half_weights.step_another; none when no caption of the batch held the word), then
        their gradients cleared; after ``pivotal_steps`` they train no more."""
        if self.training:
            step_another(scaler, self.opt, f"pivotal word {self.word!r}'s embeddings")
        for v in self.vectors.values():
            v.grad = None
        if self.until is not None and step >= self.until:
            for v in self.vectors.values():
                v.requires_grad_(False)

    def bundle(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The ``bundle_emb.`` tensors a save adds."""
        return bundle_tensors(self.word, {p: v.detach().to("cpu", dtype).clone() for p, v in self.vectors.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"word": self.word, "vectors": {p: v.detach().cpu().clone() for p, v in self.vectors.items()},
                "training": self.training, "optimizer": self.opt.state_dict()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """A resume state's record (``state_dict``) back; refused when it is another word's."""
        if st.get("word") != self.word or set(st.get("vectors", {})) != set(self.vectors):
            raise ValueError(f"the state's pivotal tuning is for {st.get('word')!r}, not {self.word!r}")
        with torch.no_grad():
            for p, v in self.vectors.items():
                v.copy_(st["vectors"][p])
        self.opt.load_state_dict(st["optimizer"])
        for v in self.vectors.values():
            v.requires_grad_(bool(st["training"]))


def _placing(ids: list[int], vectors: Tensor) -> Callable:
    """A forward hook on a token-embedding table: its output with ``vectors[k]`` at the k-th token of every
    occurrence of ``ids`` in a row."""
    n = len(ids)

    def hook(module: nn.Module, inputs: tuple, out: Tensor) -> Tensor:
        tokens = inputs[0]
        if tokens.shape[-1] < n:
            return out
        seq = torch.tensor(ids, device=tokens.device, dtype=tokens.dtype)
        starts = (tokens.unfold(-1, n, 1) == seq).all(-1)          # [..., L - n + 1]
        if not bool(starts.any()):
            return out
        vec = vectors.to(out.dtype)
        for k in range(n):
            at = nn.functional.pad(starts, (k, n - 1 - k))           # token k of each occurrence
            out = torch.where(at.unsqueeze(-1), vec[k], out)
        return out
    return hook
