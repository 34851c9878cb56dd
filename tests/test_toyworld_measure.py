"""measure.py's bundled embeddings: the renderer puts a LoRA's bundled embedding in place of its name.

The reference is a copy of the toy text encoder whose token-embedding rows for the trigger's tokens are
overwritten with the vectors: for a prompt where those tokens occur only as the whole trigger, the renderer's
encoder must give exactly that copy's output.
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
