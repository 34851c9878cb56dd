"""Textual inversions (a LoRA's bundled embeddings) in the command line's prompt encoding, as the WebUI's
embedding database places them: the name's tokens give way to the embedding's vectors, one position each,
never split between two 77-token chunks.

The references: token layouts worked by hand, and copies of the text encoders whose token-embedding rows at
ids the prompts never use hold the vectors, run on those ids where the placeholders are.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lib_lora.bundled import BundledEmbedding, token_table
from lib_lora.hosts.cli.checkpoint import Checkpoint
from lib_lora.hosts.cli.conditioning import tokenize
from lib_lora.hosts.cli.tokenizer import BOS, EOS, _bpe, clip_chunk_tokenize
from tiny_models import build_sd1, build_sdxl
from train_support import tiny_vae

SPARE = 300   # ids from here on stand for the vectors in the reference encoders (not in the prompts below)


def test_an_embedding_takes_one_position_per_vector_and_is_never_split_between_chunks():
    zkx = _bpe().encode("zkx")
    a, b = _bpe().encode("a")[0], _bpe().encode("b")[0]
    fixes: list = []
    ids = clip_chunk_tokenize(["a zkx b"], EOS, embeddings=[(zkx, 3)], fixes=fixes)
    assert ids[0, 0, :7].tolist() == [BOS, a, 0, 0, 0, b, EOS] and fixes == [(0, 0, 2, 0)]
    # 74 words fill a chunk to one short of its 75: a 3-vector embedding starts the next chunk
    fixes = []
    ids = clip_chunk_tokenize([" ".join(["a"] * 74) + " zkx b", "zkx"], EOS, embeddings=[(zkx, 3)], fixes=fixes)
    assert ids.shape[:2] == (2, 2)
    assert ids[0, 0, 74].item() == a and ids[0, 0, 75].item() == EOS
    assert ids[0, 1, :6].tolist() == [BOS, 0, 0, 0, b, EOS]
    assert fixes == [(0, 1, 1, 0), (1, 0, 1, 0)]
    # a chunk full at a word, 10 tokens after a comma: the words after the comma and an embedding among them
    # start the next chunk (the WebUI's word wrap), and the embedding's place moves with them
    fixes = []
    ids = clip_chunk_tokenize([" ".join(["a"] * 64) + ", a zkx " + " ".join(["a"] * 10)], EOS,
                              embeddings=[(zkx, 2)], fixes=fixes)
    assert ids[0, 0, 65].item() == _bpe().encode(",")[0] and ids[0, 0, 66].item() == EOS
    assert ids[0, 1, :4].tolist() == [BOS, a, 0, 0] and fixes == [(0, 1, 2, 0)]


def _reference(te, vectors: torch.Tensor):
    ref = copy.deepcopy(te)
    with torch.no_grad():
        token_table(ref).weight[SPARE:SPARE + vectors.shape[0]] = vectors
    return ref


def _spare_ids(ck: Checkpoint, prompts: list[str], emb: BundledEmbedding) -> list[torch.Tensor]:
    """Our token layout, with each placement's placeholders replaced by the spare ids."""
    fixes: list = []
    chunked = tokenize(ck.config["text_encoders"], prompts, None, [(_bpe().encode(emb.name), emb.count)], fixes)
    assert fixes
    for t in chunked:
        for p, c, pos, _ in fixes:
            t[p, c, pos:pos + emb.count] = torch.arange(SPARE, SPARE + emb.count)
    return chunked


def test_sd1_conditioning_is_the_encoders_with_the_vectors_as_token_rows():
    tiny = build_sd1(seed=2)
    ck = Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae())
    te = ck.text_encoders[0][1]
    g = torch.Generator().manual_seed(3)
    emb = BundledEmbedding("zkx", {"": 0.3 * torch.randn(3, te.config.hidden_size, generator=g)})
    prompts = ["a photo of zkx", "zkx, red, " * 30, "nothing here"]
    with torch.no_grad():
        plain = ck.encode_text(prompts).context
        ck.embeddings = [emb]
        got = ck.encode_text(prompts).context
        ck.embeddings = []
        ids = _spare_ids(ck, prompts, emb)[0]
        want = _reference(te, emb.vectors[""])(input_ids=ids.flatten(0, 1)).last_hidden_state
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2, :77], plain[2, :77], rtol=0, atol=0)   # a prompt without the name: as before
    assert not torch.allclose(got[0, :77], plain[0, :77], atol=1e-3)


def test_sdxl_uses_each_encoders_part_for_context_and_pooled():
    tiny = build_sdxl(seed=4)
    ck = Checkpoint.from_modules("sdxl", tiny.unet, tiny.text_encoders, tiny_vae())
    (_, te1), (_, te2) = ck.text_encoders
    g = torch.Generator().manual_seed(5)
    w1, w2 = token_table(te1).weight.shape[1], token_table(te2).weight.shape[1]
    emb = BundledEmbedding("zkx", {"clip_l": 0.3 * torch.randn(2, w1, generator=g),
                                   "clip_g": 0.3 * torch.randn(2, w2, generator=g)})
    prompts = ["a zkx on a dotted background"]
    with torch.no_grad():
        ck.embeddings = [emb]
        got = ck.encode_text(prompts)
        ck.embeddings = []
        ref = copy.copy(ck)
        ref.text_encoders = [("te1", _reference(te1, emb.vectors["clip_l"])),
                             ("te2", _reference(te2, emb.vectors["clip_g"]))]
        ids = _spare_ids(ck, prompts, emb)
        from lib_lora.hosts.cli.conditioning import _encode
        want = _encode("sdxl", ref.text_encoders, ids, None, ck.resolution,
                       int(ck.config.get("size_embed_dim", 256)), None, None)
    torch.testing.assert_close(got.context, want.context, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.y, want.y, rtol=0, atol=1e-5)


def test_which_embeddings_a_model_can_use():
    tiny = build_sd1(seed=2)
    ck = Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae())
    w = token_table(ck.text_encoders[0][1]).weight.shape[1]
    ok, wide, xl, long_ = (BundledEmbedding("ok", {"": torch.zeros(1, w)}), BundledEmbedding("wide", {"": torch.zeros(1, w + 1)}),
                           BundledEmbedding("xl", {"clip_l": torch.zeros(1, w), "clip_g": torch.zeros(1, 8)}),
                           BundledEmbedding("long", {"": torch.zeros(76, w)}))
    usable, messages = ck.embeddings_for([("a", ok), ("b", ok), ("c", wide), ("d", xl), ("e", long_)])
    assert usable == [ok]
    assert messages[0] == "b: bundled embedding 'ok' is also bundled in another LoRA of this prompt — the first one is used"
    assert messages[1].startswith("c: embedding 'wide' is") and messages[1].endswith("— skipped")
    assert "one-text-encoder" not in messages[2] and messages[2].startswith("d: embedding 'xl' is for SDXL")
    assert messages[3] == "e: embedding 'long' has 76 vectors, more than one chunk of 75 — skipped"


@pytest.mark.parametrize("n", [1, 2])
def test_vectors_take_gradients(n):
    tiny = build_sd1(seed=2)
    ck = Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae())
    te = ck.text_encoders[0][1]
    te.requires_grad_(False)
    vec = torch.zeros(n, te.config.hidden_size, requires_grad=True)
    ck.embeddings = [BundledEmbedding("zkx", {"": vec})]
    ck.encode_text(["a zkx"]).context.square().sum().backward()
    assert vec.grad is not None and bool(vec.grad.abs().sum(1).gt(0).all())
