"""Prompts -> UNet conditioning, with the text encoders run as the WebUI's embedders run them (CLIP skip 1),
or at kohya's ``--clip_skip`` for SD1/SD2, and with kohya's ``--max_token_length`` caption chunks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ...bundled import BundledEmbedding, token_table
from ...training.model import Conditioning, SizeCond
from .tokenizer import EOS, _bpe, clip_chunk_tokenize, kohya_tokenize


def _dev(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _open_clip_run(model: nn.Module, tokens: Tensor, layers: int) -> list[Tensor]:
    """Hidden states after each of the first ``layers`` resblocks (index 0 = embeddings)."""
    x = model.token_embedding(tokens) + model.positional_embedding.to(model.token_embedding.weight.dtype)
    mask = model.attn_mask.to(x.dtype) if model.attn_mask is not None else None
    batch_first = getattr(model.transformer, "batch_first", False)
    hidden = [x]
    for r in list(model.transformer.resblocks)[:layers]:
        # open_clip 3.x is batch-first; the WebUI's older open_clip is sequence-first
        h = r(x if batch_first else x.permute(1, 0, 2), attn_mask=mask)
        x = h if batch_first else h.permute(1, 0, 2)
        hidden.append(x)
    return hidden


def _project(model: nn.Module, pooled: Tensor) -> Tensor:
    proj = model.text_projection
    return proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj


def _size_embedding(size_conds: list[SizeCond], dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """sgm's three ConcatTimestepEmbedderND: timestep_embedding(dim) of each of the 6 scalars
    (original h, w, crop top, left, target h, w), concatenated in that order."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    ids = torch.tensor([[*o, *c, *t] for o, c, t in size_conds], dtype=torch.float32, device=device)
    return timestep_embedding(ids.flatten(), dim).reshape(len(size_conds), -1).to(dtype)


def tokenize(tcfgs: list[dict[str, Any]], prompts: list[str], max_token_length: int | None = None,
             embeddings: Sequence[tuple[list[int], int]] = (), fixes: list | None = None) -> list[Tensor]:
    """Token ids [B, chunks, context] per text encoder (HF CLIP pads with EOS, OpenCLIP with 0): as
    many chunks as the longest prompt needs, or kohya's ``max_token_length`` // 75 (kohya_tokenize).
    ``embeddings``/``fixes``: textual inversions placed as ``clip_chunk_tokenize`` places them (the same
    places for every encoder: one BPE)."""
    out = []
    for k, tcfg in enumerate(tcfgs):
        pad = EOS if tcfg["kind"] == "hf_clip" else 0
        out.append(clip_chunk_tokenize(prompts, pad, tcfg["context_length"], embeddings=embeddings,
                                       fixes=fixes if k == 0 else None) if max_token_length is None
                   else kohya_tokenize(prompts, pad, max_token_length, tcfg["context_length"]))
    return out


def embeddings_used(tcfgs: list[dict[str, Any]], prompts: list[str], embeddings: Sequence[BundledEmbedding]
                    ) -> list[BundledEmbedding]:
    """Those of ``embeddings`` that the prompts name, found as the encoding places them (the WebUI's ``TI hashes``
    lists these)."""
    fixes: list[tuple[int, int, int, int]] = []
    tokenize(tcfgs, list(prompts), None, [(_bpe().encode(e.name), e.count) for e in embeddings], fixes)
    return [embeddings[i] for i in sorted({e for *_, e in fixes})]


@contextmanager
def _placed(text_encoders: list[tuple[str, nn.Module]], parts: list[str], chunks: int,
            fixes: list[tuple[int, int, int, int]], embeddings: Sequence[BundledEmbedding]) -> Iterator[None]:
    """While encoding: each placed embedding's vectors (its ``parts[k]`` for encoder k) in place of the
    placeholders its token embeddings hold, row ``prompt * chunks + chunk`` of the encoders' batch."""
    def hook_for(part: str):
        def hook(module, inputs, out):
            out = out.clone()
            for p, c, pos, e in fixes:
                vec = embeddings[e].vectors[part]
                out[p * chunks + c, pos:pos + vec.shape[0]] = vec.to(out.device, out.dtype)
            return out
        return hook

    handles = [token_table(te).register_forward_hook(hook_for(part))
               for (_, te), part in zip(text_encoders, parts)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _skip(clip_skip: int | None, layers: int) -> int:
    """How many of ``layers`` final layers CLIP skip ``clip_skip`` leaves out (None: 1, the last layer kept)."""
    n = 1 if clip_skip is None else int(clip_skip)
    if not 1 <= n <= layers:
        raise ValueError(f"clip_skip {n}: the text encoder has {layers} layers (1 to {layers})")
    return n


def encode_text(family: str, text_encoders: list[tuple[str, nn.Module]], tcfgs: list[dict[str, Any]],
                prompts: list[str], size_conds: list[SizeCond] | None, *, resolution: int,
                size_embed_dim: int, clip_skip: int | None = None,
                max_token_length: int | None = None, embeddings: Sequence[BundledEmbedding] = ()) -> Conditioning:
    """Cross-attention context (and SDXL's y) as the WebUI computes it with CLIP skip 1.

    ``tcfgs`` are the text encoders' configs; ``resolution`` gives SDXL's size conditioning when
    ``size_conds`` is None, and ``size_embed_dim`` the width of each of its six embeddings.
    ``clip_skip`` (SD1/SD2; None = 1) is sd-scripts': the hidden state ``clip_skip`` from the end,
    then the final layer norm.  sd-scripts' SD2 text encoder is the OpenCLIP one without its last
    block, so SD2 stops ``clip_skip`` blocks before the end.  SDXL has fixed layers (the caller
    says that it ignores clip skip, as sd-scripts does).
    ``max_token_length`` (75, 150, 225; None = as many chunks as needed, each kept whole, as the
    WebUI does) is sd-scripts' caption limit: its chunks' states are joined as sd-scripts joins
    them, the first BOS, each chunk's 75 inner positions, then the last chunk's final position
    (75n + 2 in all); SDXL's pooled vector is the first chunk's.
    No ``no_grad`` here: gradients reach text encoders (or LoRA modules hooked onto them) whenever
    anything there requires grad; callers that only infer wrap this in ``torch.no_grad``.
    ``embeddings`` (fitting the model, at most one chunk long each) stand for their names in the prompts as
    the WebUI's embedding database makes them (not under ``max_token_length``, which is training's).
    """
    fixes: list[tuple[int, int, int, int]] = []
    names = [(_bpe().encode(e.name), e.count) for e in embeddings]
    chunked = tokenize(tcfgs, list(prompts), max_token_length, names, fixes)
    if fixes:
        parts = [""] if family != "sdxl" else ["clip_l", "clip_g"]
        with _placed(text_encoders, parts, chunked[0].shape[1], fixes, embeddings):
            return _encode(family, text_encoders, chunked, size_conds, resolution, size_embed_dim, clip_skip,
                           max_token_length)
    return _encode(family, text_encoders, chunked, size_conds, resolution, size_embed_dim, clip_skip, max_token_length)


def _encode(family: str, text_encoders: list[tuple[str, nn.Module]], chunked: list[Tensor],
            size_conds: list[SizeCond] | None, resolution: int, size_embed_dim: int, clip_skip: int | None,
            max_token_length: int | None) -> Conditioning:
    b, n = chunked[0].shape[:2]
    tokens = [t.flatten(0, 1) for t in chunked]   # every chunk of every prompt in one batch

    def joined(h: Tensor) -> Tensor:              # [B*n, L, C] -> [B, n*L, C], chunks side by side
        h = h.reshape(b, n, h.shape[1], h.shape[2])
        if max_token_length is not None and n > 1:  # kohya: BOS, every chunk's inner 75, the last position
            return torch.cat([h[:, 0, :1], h[:, :, 1:-1].flatten(1, 2), h[:, -1, -1:]], dim=1)
        return h.flatten(1, 2)

    if family == "sd1":  # FrozenCLIPEmbedder(layer="last"): last_hidden_state (after final LN)
        te = text_encoders[0][1]
        skip = _skip(clip_skip, te.config.num_hidden_layers)
        if skip == 1:
            return Conditioning(joined(te(input_ids=tokens[0].to(_dev(te))).last_hidden_state))
        out = te(input_ids=tokens[0].to(_dev(te)), output_hidden_states=True)
        return Conditioning(joined(te.text_model.final_layer_norm(out.hidden_states[-skip])))
    if family == "sd2":  # FrozenOpenCLIPEmbedder(layer="penultimate"): skip last block, then ln_final
        te = text_encoders[0][1]
        blocks = len(te.transformer.resblocks)
        hidden = _open_clip_run(te, tokens[0].to(_dev(te)), blocks - _skip(clip_skip, blocks - 1))
        return Conditioning(joined(te.ln_final(hidden[-1])))
    # SDXL: te1 hidden_states[-2] (no final LN), te2 penultimate (no ln_final, legacy=False) and the
    # pooled ln_final(last)[eos] @ text_projection of the first chunk (as the WebUI takes it);
    # y = pooled ++ size embeddings (sgm GeneralConditioner)
    te1, te2 = text_encoders[0][1], text_encoders[1][1]
    h1 = joined(te1(input_ids=tokens[0].to(_dev(te1)), output_hidden_states=True).hidden_states[-2])
    t2 = chunked[1][:, 0].to(_dev(te2))
    hidden = _open_clip_run(te2, tokens[1].to(_dev(te2)), len(te2.transformer.resblocks))
    last = te2.ln_final(hidden[-1].reshape(b, n, *hidden[-1].shape[1:])[:, 0])
    pooled = _project(te2, last[torch.arange(b, device=last.device), t2.argmax(dim=-1)])
    if size_conds is None:
        r = resolution
        size_conds = [((r, r), (0, 0), (r, r))] * b
    if len(size_conds) != b:
        raise ValueError(f"{len(size_conds)} size conditions for {b} prompts")
    y = torch.cat([pooled, _size_embedding(size_conds, size_embed_dim, pooled.device, pooled.dtype)], dim=-1)
    return Conditioning(torch.cat([h1, joined(hidden[-2]).to(h1.device, h1.dtype)], dim=-1), y.to(h1.device))
