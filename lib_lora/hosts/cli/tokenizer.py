"""CLIP token ids as the WebUI's embedders get them, from the real CLIP BPE (it ships inside open_clip)."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import Tensor

BOS, EOS = 49406, 49407        # <|startoftext|>, <|endoftext|> in the CLIP BPE vocabulary
CONTEXT_LENGTH = 77


@functools.lru_cache(maxsize=1)
def _bpe() -> Any:
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def word_ids(word: str) -> list[int]:
    """A word's token ids as they stand in a tokenised prompt (no start or end token)."""
    return list(_bpe().encode(word))


def clip_tokenize(prompts: list[str], pad_id: int, context_length: int = CONTEXT_LENGTH) -> Tensor:
    """[BOS] + tokens[:context_length-2] + [EOS], padded with ``pad_id`` to ``context_length``.

    pad_id=EOS (49407) is HF ``CLIPTokenizer`` for openai/clip-vit-large-patch14 (pad_token
    <|endoftext|>), i.e. ldm/sgm ``FrozenCLIPEmbedder`` (SD1, SDXL te1); pad_id=0 is
    ``open_clip.tokenize`` (SD2, SDXL te2).  Both truncate to one 77-token chunk, as kohya does by
    default (the WebUI's prompt chunking / emphasis syntax are not reproduced).
    """
    bpe = _bpe()
    out = torch.full((len(prompts), context_length), pad_id, dtype=torch.long)
    for i, text in enumerate(prompts):
        ids = [BOS] + bpe.encode(text)[: context_length - 2] + [EOS]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def clip_chunk_tokenize(prompts: list[str], pad_id: int, context_length: int = CONTEXT_LENGTH,
                        comma_backtrack: int = 20, embeddings: Sequence[tuple[list[int], int]] = (),
                        fixes: list[tuple[int, int, int, int]] | None = None) -> Tensor:
    """Token ids [B, chunks, context_length]: prompts of any length, cut into chunks as the WebUI does.

    Each chunk holds ``context_length - 2`` tokens between BOS and EOS and is encoded on its own;
    the contexts are then concatenated, so a 100-token caption conditions on 154 positions, not
    on a truncated 77.  A chunk boundary falling at most ``comma_backtrack`` tokens after a comma
    moves the words after that comma to the next chunk (the WebUI's "prompt word wrap length
    limit", default 20).  Prompts with fewer chunks than the longest get empty chunks (BOS then
    padding), which is also what an empty prompt encodes to.  Emphasis syntax is not parsed.

    ``embeddings`` are textual inversions, each ``(its name's token ids, its vector count)``: where a name
    occurs (the longest that matches first), its tokens give way to as many placeholder positions as it has
    vectors, never split between two chunks (a chunk it would not fit in ends early), as the WebUI places
    them; each placement goes to ``fixes`` as ``(prompt, chunk, position in the chunk, embedding index)``.
    """
    bpe = _bpe()
    comma = bpe.encoder.get(",</w>")
    size = context_length - 2
    order = sorted(range(len(embeddings)), key=lambda e: -len(embeddings[e][0]))
    per_prompt = []
    for p, text in enumerate(prompts):
        chunks: list[list[int]] = []
        current: list[int] = []
        placed: list[list[int]] = []    # [chunk, position in it, embedding] of this prompt's embeddings
        last_comma = -1
        toks = bpe.encode(text)
        i = 0
        while i < len(toks):
            tok = toks[i]
            if len(current) == size:
                if tok != comma and comma_backtrack and last_comma >= 0 and size - last_comma <= comma_backtrack:
                    for f in placed:    # an embedding after the comma moves with its words
                        if f[0] == len(chunks) and f[1] > last_comma + 1:
                            f[0], f[1] = f[0] + 1, f[1] - last_comma - 1
                    chunks.append(current[:last_comma + 1])
                    current = current[last_comma + 1:]
                else:
                    chunks.append(current)
                    current = []
                last_comma = -1
            e = next((e for e in order if toks[i:i + len(embeddings[e][0])] == embeddings[e][0]), None)
            if e is None:
                if tok == comma:
                    last_comma = len(current)
                current.append(tok)
                i += 1
                continue
            count = embeddings[e][1]
            if len(current) + count > size:
                chunks.append(current)
                current, last_comma = [], -1
            placed.append([len(chunks), 1 + len(current), e])   # after the chunk's BOS
            current.extend([0] * count)
            i += len(embeddings[e][0])
        if current or not chunks:
            chunks.append(current)
        per_prompt.append(chunks)
        if fixes is not None:
            fixes.extend((p, c, pos, e) for c, pos, e in placed)
    n = max(len(c) for c in per_prompt)
    out = torch.full((len(prompts), n, context_length), pad_id, dtype=torch.long)
    out[:, :, 0] = BOS
    for i, chunks in enumerate(per_prompt):
        for j in range(n):
            ids = chunks[j] if j < len(chunks) else []
            out[i, j, 1:len(ids) + 2] = torch.tensor(ids + [EOS])
    return out


def kohya_tokenize(prompts: list[str], pad_id: int, max_token_length: int,
                   context_length: int = CONTEXT_LENGTH) -> Tensor:
    """Token ids [B, max_token_length // 75, context_length]: sd-scripts' ``--max_token_length`` rule.

    The caption is cut to ``max_token_length`` tokens and padded to that length, then split into
    fixed 75-token chunks, each between BOS and the sequence's last id (EOS, or padding), so every
    caption has the same number of chunks, however short (no comma word wrap).  With OpenCLIP's
    padding (``pad_id`` 0, not EOS) a chunk cut mid-caption ends in EOS and an empty chunk starts
    with one, as sd-scripts' SD2/SDXL tokenizer strategy does.  75 is a single truncated chunk.
    """
    size = context_length - 2
    if max_token_length % size:
        raise ValueError(f"max_token_length {max_token_length}: expected a multiple of {size}")
    n = max_token_length // size
    bpe = _bpe()
    out = torch.empty((len(prompts), n, context_length), dtype=torch.long)
    for i, text in enumerate(prompts):
        words = bpe.encode(text)[:max_token_length]
        ids = [BOS] + words + [EOS] + [pad_id] * (max_token_length - len(words))
        for j in range(n):
            chunk = [BOS] + ids[1 + j * size:1 + (j + 1) * size] + [ids[-1]]
            if pad_id != EOS:
                if chunk[-2] not in (EOS, pad_id):
                    chunk[-1] = EOS
                if chunk[1] == pad_id:
                    chunk[1] = EOS
            out[i, j] = torch.tensor(chunk)
    return out
