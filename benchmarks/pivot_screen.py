"""SCREENING HOOK for ``benchmarks/concept.py``: pivotal tuning (not a trainer option; see README, "Training
quality on the toy world").

Variant keys: pivot_lr (AdamW lr of the trigger's vectors; turns it on), pivot_init ("self": the trigger's own
token embeddings, "mean": the mean embedding of the base world's caption tokens, or a word, e.g. "cross": that
word's embedding for each of the trigger's tokens), pivot_steps (train the vectors for the first N steps only;
default all).  The trigger ``zkx`` is two BPE tokens, so it gets two vectors, one per token position (what the
WebUI's embedding database does with a 2-vector embedding named zkx).  The text encoder's weights stay frozen;
captions are encoded every step (no cache) with gradients to the vectors only, which step after the LoRA's own
optimiser step; every file the run saves gets them as ``bundle_emb.zkx.string_to_param.*``, and the renderer
(measure.bundled_vectors) applies them wherever the file is active.  Once the vectors stop training
(pivot_steps), each caption's encoding is cached, so the rest of the run costs what the preset's steps cost.
"""
from __future__ import annotations

from pathlib import Path

from lib_lora.toyworld import measure
from lib_lora.toyworld.world import CONCEPTS

STAR = CONCEPTS["star"]

PIVOT_KEYS = ("pivot_lr", "pivot_init", "pivot_steps")


class Pivot:
    """The trigger's trainable vectors for one run: the hook that puts them in, the encoder wrapper, their optimiser
    (stepped from the progress callback) and the bundling of each saved file."""

    def __init__(self, ck, settings: dict[str, object]):
        import torch
        from lib_lora.hosts.cli.tokenizer import _bpe
        from lib_lora.toyworld.world import BASE_WORLD, generate

        self.te = ck.text_encoders[0][1]
        table = self.te.text_model.embeddings.token_embedding.weight.detach()
        self.seq = _bpe().encode(STAR.trigger)
        init = str(settings.get("pivot_init") or "self")
        if init == "self":
            vecs = table[self.seq].clone()
        elif init == "mean":
            used = sorted({t for _, c, _ in generate(200, 0, BASE_WORLD) for t in _bpe().encode(c)})
            vecs = table[used].mean(0, keepdim=True).repeat(len(self.seq), 1)
        else:
            word = _bpe().encode(init)
            vecs = table[word].mean(0, keepdim=True).repeat(len(self.seq), 1)
        self.vectors = torch.nn.Parameter(vecs.float().clone())
        self.opt = torch.optim.AdamW([self.vectors], lr=float(settings["pivot_lr"]), weight_decay=0.0)
        self.until = int(settings.get("pivot_steps") or 10**9)

    def hooked(self):
        return measure.token_vectors(self.te, self.seq, self.vectors)

    def encoder(self, encode_text):
        """``encode_text`` with gradients to the vectors while they train; once they are frozen (pivot_steps),
        each caption's output is cached, as the trainer caches a frozen encoder's."""
        import torch
        from lib_lora.training.model import Conditioning

        cache: dict[str, object] = {}

        def encode(prompts, sizes=None):
            if self.vectors.requires_grad:
                with torch.enable_grad():   # the trainer encodes a frozen encoder's captions under no_grad
                    return encode_text(prompts, sizes)
            with torch.no_grad():
                for p in set(prompts) - set(cache):
                    cache[p] = encode_text([p], None).context
            return Conditioning(torch.cat([cache[p] for p in prompts]))
        return encode

    def step(self, step: int) -> None:
        if step <= self.until and self.vectors.grad is not None:
            self.opt.step()
        self.vectors.grad = None
        if step == self.until:
            self.vectors.requires_grad_(False)

    def bundle(self, path: Path) -> None:
        from lib_lora.fileio import load_safetensors, save_safetensors

        tensors, meta = load_safetensors(path)
        dtype = next(iter(tensors.values())).dtype
        tensors[f"bundle_emb.{STAR.trigger}.string_to_param.*"] = self.vectors.detach().to(dtype).clone()
        save_safetensors(tensors, path, meta, overwrite=True)
