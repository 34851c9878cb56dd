"""measure.py's screening hook for bundled embeddings (benchmarks/concept.py's pivotal-tuning variant).

The reference is a copy of the toy text encoder whose token-embedding rows for the trigger's tokens are
overwritten with the vectors: for a prompt where those tokens occur only as the whole trigger, the hooked
encoder must give exactly that copy's output; elsewhere it must give the untouched encoder's.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lib_lora.bundled import BundledEmbedding
from lib_lora.hosts.cli.tokenizer import EOS, _bpe, clip_tokenize
from lib_lora.toyworld import measure


@pytest.fixture(scope="module")
def toy():
    from lib_lora.hosts.cli.checkpoint import load_checkpoint
    from lib_lora.toyworld.base_model import DEFAULT_PATH

    return load_checkpoint(DEFAULT_PATH)


def _encode(te, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return te(input_ids=clip_tokenize(prompts, EOS)).last_hidden_state


def _rows_written(te, seq: list[int], vectors: torch.Tensor):
    ref = copy.deepcopy(te)
    with torch.no_grad():
        ref.text_model.embeddings.token_embedding.weight[seq] = vectors
    return ref


def test_trigger_vectors_replace_the_whole_trigger_only(toy):
    te = toy.text_encoders[0][1]
    seq = _bpe().encode("zkx")
    assert len(seq) == 2   # z + kx: two positions, two vectors
    g = torch.Generator().manual_seed(0)
    vectors = 0.2 * torch.randn(2, te.config.hidden_size, generator=g)
    ref = _rows_written(te, seq, vectors)
    whole = ["a red zkx on a dotted background", "zkx zkx, zkx."]   # the trigger's tokens only as the trigger
    partial = ["a red zk on a plain background", "a blue square on a striped background"]  # 'z' without 'kx'
    with measure.token_vectors(te, seq, vectors):
        got_whole, got_partial = _encode(te, whole), _encode(te, partial)
    torch.testing.assert_close(got_whole, _encode(ref, whole), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_partial, _encode(te, partial), rtol=0, atol=0)
    assert not torch.allclose(got_whole, _encode(te, whole), atol=1e-3)   # the vectors did change something
    # the hook is gone afterwards
    torch.testing.assert_close(_encode(te, whole), _encode(copy.deepcopy(te), whole), rtol=0, atol=0)


def test_trigger_vectors_take_gradients(toy):
    te = toy.text_encoders[0][1]
    seq = _bpe().encode("zkx")
    vectors = torch.nn.Parameter(te.text_model.embeddings.token_embedding.weight[seq].detach().clone())
    flags = [p.requires_grad for p in te.parameters()]
    te.requires_grad_(False)
    try:
        with measure.token_vectors(te, seq, vectors):
            te(input_ids=clip_tokenize(["a red zkx on a dotted background"], EOS)).last_hidden_state.square().sum() \
                .backward()
    finally:
        for p, f in zip(te.parameters(), flags):
            p.requires_grad_(f)
    assert vectors.grad is not None and bool(vectors.grad.abs().sum(1).gt(0).all())


def test_bundled_vectors_apply_an_embedding_named_as_the_trigger(toy):
    """The renderer's bundled embeddings (the CLI's placement, tests/test_cli_embeddings.py) give, for one
    vector per token of the name, what the row-written encoder gives; the encoder is as before afterwards."""
    te = toy.text_encoders[0][1]
    seq = _bpe().encode("zkx")
    vectors = torch.linspace(-0.3, 0.3, 2 * te.config.hidden_size).reshape(2, -1)
    prompts = ["a red zkx on a dotted background"]
    with torch.no_grad(), measure.bundled_vectors(toy, [("lora", BundledEmbedding("zkx", {"": vectors}))]):
        got = toy.encode_text(prompts).context
    want = _encode(_rows_written(te, seq, vectors), prompts)
    torch.testing.assert_close(got[:, :77], want, rtol=0, atol=1e-6)
    assert toy.embeddings == []
