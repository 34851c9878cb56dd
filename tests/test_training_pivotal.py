"""Pivotal tuning (``pivotal_word``): the word's own embeddings train beside the LoRA and are bundled in every save.

References: the command line's placement of a bundled embedding (tested against encoders whose token rows hold
the vectors, test_cli_embeddings.py), which is what renders the saved file; AdamW's first step worked by hand;
an uninterrupted run for resuming; the built-in Lora's bundled-embedding layout (bundled.parse_bundle).
"""
from __future__ import annotations

import copy

import pytest
import torch

from lib_lora.bundled import BundledEmbedding, parse_bundle, split_bundle, token_table
from lib_lora.fileio import load_safetensors
from lib_lora.hashes import hashes_from_bytes
from lib_lora.hosts.cli.checkpoint import Checkpoint
from lib_lora.hosts.cli.tokenizer import EOS, clip_tokenize
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.network import NetworkConfig
from lib_lora.training.options import OptionError
from lib_lora.training.pivotal import PivotalWord
from lib_lora.training.plan import make_plan
from lib_lora.training.problems import DatasetError
from lib_lora.training.state import load_state, state_path
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1, build_sdxl
from train_support import make_dataset, tiny_vae, trainable

QUIET = Callbacks(log=lambda s: None)


def _vectors(ck: Checkpoint, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts = ["clip_l", "clip_g"] if ck.family == "sdxl" else [""]
    return {p: 0.3 * torch.randn(n, token_table(te).weight.shape[1], generator=g)
            for p, (_, te) in zip(parts, ck.text_encoders)}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_trained_vectors_encode_as_the_saved_embedding_renders(family):
    tiny = (build_sd1 if family == "sd1" else build_sdxl)(seed=2)
    ck = Checkpoint.from_modules(family, tiny.unet, tiny.text_encoders, tiny_vae())
    model = ck.trainable()
    n = len(model.tokenize_word("zkx")[0])
    assert n == 2   # two BPE tokens: one vector per position
    emb = BundledEmbedding("zkx", _vectors(ck, n, 3))
    word = PivotalWord(model, "zkx", 1e-3, start=emb)
    prompts = ["a photo of zkx", "zkx, red, zkx", "nothing here"]
    with torch.no_grad():
        plain = model.encode_text(prompts, None)
        with word.placed():
            got = model.encode_text(prompts, None)
        after = model.encode_text(prompts, None)
        ck.embeddings = [emb]           # how the saved file's bundled embedding renders
        want = ck.encode_text(prompts)
        ck.embeddings = []
    torch.testing.assert_close(got.context, want.context, rtol=0, atol=1e-5)
    if family == "sdxl":
        torch.testing.assert_close(got.y, want.y, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.context[2], plain.context[2], rtol=0, atol=0)   # no word: untouched
    assert not torch.allclose(got.context[0], plain.context[0], atol=1e-3)
    torch.testing.assert_close(after.context, plain.context, rtol=0, atol=0)       # the hook is gone
    assert not any(t._forward_hooks for _, t in word.tables)


def test_only_the_whole_word_takes_the_vectors_and_they_take_gradients():
    """Reference: a copy of the encoder whose token rows for the word's ids hold the vectors (right wherever
    those ids occur only as the whole word)."""
    tiny = build_sd1(seed=5)
    ck = Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae())
    model = ck.trainable()
    te = ck.text_encoders[0][1]
    word = PivotalWord(model, "zkx", 1e-3, start=BundledEmbedding("zkx", _vectors(ck, 2, 0)))
    ref = copy.deepcopy(te)
    with torch.no_grad():
        token_table(ref).weight[word.ids] = word.vectors[""]
    whole = ["a red zkx on a dotted background", "zkx zkx, zkx."]
    partial = ["a red zk on a plain background", "a blue square on a striped background"]  # 'z' without 'kx'
    te.requires_grad_(False)
    with word.placed():
        got = te(input_ids=clip_tokenize(whole + partial, EOS)).last_hidden_state
    with torch.no_grad():
        want = ref(input_ids=clip_tokenize(whole, EOS)).last_hidden_state
        plain = te(input_ids=clip_tokenize(partial, EOS)).last_hidden_state
    torch.testing.assert_close(got[:2].detach(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[2:].detach(), plain, rtol=0, atol=0)
    got[:2].square().sum().backward()
    assert bool(word.vectors[""].grad.abs().sum(1).gt(0).all())


def _config(tmp_path, out: str, **kw) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data)
    ds = DatasetConfig(data, resolution=64, enable_buckets=False)
    kw = {"max_train_steps": 6, "pivotal_word": "zkx", "pivotal_lr": 1e-2, **kw}
    return TrainConfig(ds, NetworkConfig(rank=4, alpha=4, train_text_encoder=False), output_dir=tmp_path / out,
                       output_name="t", learning_rate=2e-3, save_precision="fp32", seed=1, **kw)


def test_a_run_trains_the_vectors_and_bundles_them_in_every_save(tmp_path, vae):
    tiny = build_sd1(seed=3)
    model = trainable(tiny, vae)
    table = token_table(tiny.text_encoders[0][1]).weight.detach().clone()
    ids = model.tokenize_word("zkx")[0]
    one = Trainer(model, make_plan(_config(tmp_path, "one", max_train_steps=1)), QUIET).run()
    emb = parse_bundle("t", split_bundle(load_safetensors(one.output)[0])[1])["zkx"]
    # AdamW's first step moves each entry with a gradient by lr (Adam's m/sqrt(v) is its sign), no decay
    moved = emb.vectors[""] - table[ids]
    assert moved.abs().max() <= 1e-2 * 1.0001 and moved.abs().gt(0.99e-2).float().mean() > 0.9
    assert torch.equal(token_table(tiny.text_encoders[0][1]).weight, table)   # the model's table untouched

    res = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "run", save_every_n_steps=3)), QUIET).run()
    assert [p.name for p in res.saved] == ["t-step00000003.safetensors", "t.safetensors"]
    prev = None
    for path in res.saved:
        tensors, meta = load_safetensors(path)
        lora, bundle = split_bundle(tensors)
        assert set(bundle) == {"bundle_emb.zkx.string_to_param.*"}
        assert bundle["bundle_emb.zkx.string_to_param.*"].shape == (2, table.shape[1])
        assert prev is None or not torch.equal(prev, bundle["bundle_emb.zkx.string_to_param.*"])
        prev = bundle["bundle_emb.zkx.string_to_param.*"]
        # kohya's hashes are of the file as written (with its bundle), only the ss_* keys in the header
        from safetensors.torch import save as st_save
        h = hashes_from_bytes(st_save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")}))
        assert meta["sshs_model_hash"] == h["sshs_model_hash"]
        assert (meta["ss_pivotal_word"], meta["ss_pivotal_lr"], meta["ss_pivotal_steps"]) == ("zkx", "0.01", "0")
    plain = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "plain", pivotal_word="")), QUIET).run()
    tensors, meta = load_safetensors(plain.output)
    assert not split_bundle(tensors)[1] and not any(k.startswith("ss_pivotal") for k in meta)


def test_after_pivotal_steps_the_vectors_stay(tmp_path, vae):
    tiny = build_sd1(seed=3)
    res = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "s", pivotal_steps=2, save_every_n_steps=1)),
                  QUIET).run()
    vecs = [load_safetensors(p)[0]["bundle_emb.zkx.string_to_param.*"] for p in res.saved]
    assert not torch.equal(vecs[0], vecs[1])
    assert all(torch.equal(vecs[1], v) for v in vecs[2:])
    loras = [split_bundle(load_safetensors(p)[0])[0] for p in res.saved]
    key = next(k for k in loras[0] if k.endswith("lora_up.weight"))
    assert not torch.equal(loras[-2][key], loras[-1][key])       # the LoRA goes on training


@pytest.mark.parametrize("ema,until", [(None, 4), (0.8, 4), (None, 2)])
def test_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path, vae, ema, until):
    """Resumed at step 3: while the vectors still train (pivotal_steps 4), or after they stopped (2)."""
    tiny = build_sd1(seed=3)
    full = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "full", ema_decay=ema, pivotal_steps=until)),
                   QUIET).run()
    part = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "part", ema_decay=ema, pivotal_steps=until,
                                                           save_every_n_steps=3, save_state=True)), QUIET).run()
    st_path = state_path(part.saved[0])
    assert load_state(st_path).pivotal["word"] == "zkx"
    assert load_state(st_path).pivotal["training"] == (until > 3)
    resumed = Trainer(trainable(tiny, vae),
                      make_plan(_config(tmp_path, "part", ema_decay=ema, pivotal_steps=until, save_every_n_steps=3,
                                        save_state=True, overwrite=True), resume_from=st_path), QUIET).run()
    a, b = load_safetensors(full.output)[0], load_safetensors(resumed.output)[0]
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_state_of_another_word_is_refused(tmp_path, vae):
    tiny = build_sd1(seed=3)
    part = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "p", save_every_n_steps=3, save_state=True)),
                   QUIET).run()
    with pytest.raises(ValueError, match="pivotal_word zkx.*off"):
        Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "p", pivotal_word="", save_every_n_steps=3,
                                                        save_state=True, overwrite=True),
                                                resume_from=state_path(part.saved[0])), QUIET).run()


def test_starting_from_a_pivotal_file_starts_from_its_vectors(tmp_path, vae):
    tiny = build_sd1(seed=3)
    first = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "a")), QUIET).run()
    start = load_safetensors(first.output)[0]["bundle_emb.zkx.string_to_param.*"]
    logs: list[str] = []
    again = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "b", network_weights=first.output,
                                                            max_train_steps=1, pivotal_lr=1e-6)),
                    Callbacks(log=logs.append)).run()
    got = load_safetensors(again.output)[0]["bundle_emb.zkx.string_to_param.*"]
    assert (got - start).abs().max() <= 1.01e-6 and not torch.equal(got, start)
    # without pivotal_word the file's embedding is said to be left behind, and the LoRA still loads
    logs.clear()
    off = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "c", network_weights=first.output,
                                                          max_train_steps=1, pivotal_word="")),
                  Callbacks(log=logs.append)).run()
    assert not split_bundle(load_safetensors(off.output)[0])[1]
    assert any("bundled embedding(s) zkx are not trained or saved" in s for s in logs)


@pytest.mark.parametrize("word", ["zk.x", "two words", "<zkx>", 5])
def test_a_word_that_cannot_be_an_embeddings_name_is_refused(tmp_path, word):
    with pytest.raises(OptionError, match="pivotal_word"):
        TrainConfig(DatasetConfig(tmp_path), pivotal_word=word)


def test_a_word_in_no_caption_is_refused_before_the_run(tmp_path):
    with pytest.raises(DatasetError, match="pivotal_word: 'qwv' is in none of the training images' captions"):
        make_plan(_config(tmp_path, "x", pivotal_word="qwv"))
    make_plan(_config(tmp_path, "x", pivotal_word="ZKX"))   # CLIP lower-cases the prompt: found


def test_sdxl_encoders_that_split_the_word_differently_are_refused():
    tiny = build_sdxl(seed=4)
    model = trainable(tiny)
    model.tokenize_word = lambda w: [[1, 2], [1, 3]]
    with pytest.raises(ValueError, match="tokenise it differently"):
        PivotalWord(model, "zkx", 1e-3)


def test_a_step_boundarys_contents_carry_the_vectors_for_name_at_live(tmp_path, vae):
    """What ``NAME@live`` parses between two steps holds the word's vectors as trained so far, as a save at that
    step would write them."""
    from lib_lora.network import parse_state_dict

    tiny = build_sd1(seed=3)
    seen = {}

    def between(b):
        tensors, meta = b.contents()
        seen[b.step] = parse_state_dict("t@live", {k: v.detach().cpu() for k, v in tensors.items()}, meta)

    res = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "live", max_train_steps=3, save_every_n_steps=2)),
                  Callbacks(log=lambda s: None, between_steps=between)).run()
    assert sorted(seen) == [1, 2]
    saved = load_safetensors(res.saved[0])[0]["bundle_emb.zkx.string_to_param.*"]    # the step-2 save
    assert torch.equal(seen[2].embeddings["zkx"].vectors[""], saved)
    assert not torch.equal(seen[1].embeddings["zkx"].vectors[""], saved)


def _vector_opt(grad: torch.Tensor):
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = grad.clone()
    return p, torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)


def test_the_vectors_step_through_the_runs_loss_scaler():
    """The vectors' gradients are unscaled by the run's loss scale before their step, and a non-finite one skips
    the step and lowers the scale as the LoRA's own would (HalfStep and torch's GradScaler), or is an error."""
    from lib_lora.training.half_weights import HalfStep, step_another

    half = HalfStep(torch.float16, log=lambda s: None)
    scale = half.loss_scale
    p, opt = _vector_opt(torch.full((2, 3), scale * 1e-3))
    step_another(half, opt, "v")
    torch.testing.assert_close(p.grad, torch.full((2, 3), 1e-3))       # unscaled before AdamW saw it
    assert torch.allclose(p.detach(), torch.full((2, 3), -0.1))         # AdamW's first step: lr against the sign
    p, opt = _vector_opt(torch.tensor([[1.0, float("inf"), 0], [0, 0, 0]]))
    step_another(half, opt, "v")
    half.update()
    assert torch.equal(p.detach(), torch.zeros(2, 3)) and half.skipped == 1 and half.loss_scale == scale / 2

    gs = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gs.scale(torch.tensor(1.0))                     # as the run's backward did
    p, opt = _vector_opt(torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]]))
    step_another(gs, opt, "v")
    gs.update()
    assert torch.equal(p.detach(), torch.zeros(2, 3)) and gs.get_scale() == 512.0

    off = torch.amp.GradScaler("cpu", enabled=False)
    p, opt = _vector_opt(torch.tensor([[1.0, float("inf"), 0], [0, 0, 0]]))
    with pytest.raises(FloatingPointError, match="gradient of v is not finite"):
        step_another(off, opt, "v")
    p, opt = _vector_opt(torch.zeros(2, 3))
    p.grad = None                                   # a batch without the word: no step, and no complaint
    gs.scale(torch.tensor(1.0))
    step_another(gs, opt, "v")
    assert not opt.state


def test_the_caption_check_follows_clips_word_splitting():
    from lib_lora.training.checks import pivotal_caption_problem

    for caption in ("zkx, red", "a ZKX-style drawing", "zkx_style", "zkx2 on grey"):
        assert pivotal_caption_problem("zkx", [caption]) is None, caption
    for caption in ("zkxs on grey", "azkx"):
        assert "none of the training images' captions" in pivotal_caption_problem("zkx", [caption]), caption


def test_sdxl_trains_one_vector_set_per_text_encoder_and_bundles_them_as_clip_l_and_clip_g(tmp_path, vae):
    """Both encoders' tables take the word's vectors, each trains (the pooled output and the context carry the
    gradient), and the file holds them as the built-in reads an SDXL embedding; the model is left as it was."""
    from lib_lora.network import load_network
    from loras import same, snapshot

    tiny = build_sdxl(seed=0)
    before = snapshot(tiny.unet, *[m for _, m in tiny.text_encoders])
    tables = [token_table(te).weight.detach().clone() for _, te in tiny.text_encoders]
    model = trainable(tiny, vae)
    ids = model.tokenize_word("zkx")[0]
    res = Trainer(model, make_plan(_config(tmp_path, "xl", max_train_steps=2)), QUIET).run()
    net = load_network(res.output)
    emb = net.embeddings["zkx"]
    assert set(emb.vectors) == {"clip_l", "clip_g"} and emb.count == len(ids)
    for part, table in zip(("clip_l", "clip_g"), tables):
        assert emb.vectors[part].shape == (len(ids), table.shape[1])
        assert 0.5e-2 < (emb.vectors[part] - table[ids]).abs().max() <= 2 * 1e-2 * 0.1 / 0.001 ** 0.5, part
    assert emb.misfit({"clip_l": tables[0].shape[1], "clip_g": tables[1].shape[1]}) is None
    assert same(before, snapshot(tiny.unet, *[m for _, m in tiny.text_encoders]))
