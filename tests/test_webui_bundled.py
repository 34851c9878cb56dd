"""Textual-inversion embeddings bundled in a LoRA file (``bundle_emb.*``): parsed and checked by the core
(lib_lora/bundled.py), registered in the WebUI's embedding database around a generation
(lib_lora/hosts/webui_embeddings.py), seen by the prompt's conditioning, and gone afterwards."""
from __future__ import annotations

import pytest
import torch

from webui_glue_support import SD1_META, BuiltinLora, encode_prompt, make_lora  # noqa: E402  (stub on sys.path)

from modules import sd_hijack, shared  # noqa: E402

from lib_lora.bundled import parse_bundle  # noqa: E402
from lib_lora.fileio import LoraFileError, load_file, save_safetensors  # noqa: E402
from lib_lora.network import load_network  # noqa: E402

WIDTH = 32  # the tiny CLIP's hidden size (webui_glue_support.tiny_clip)


def _vectors(n=2, width=WIDTH, seed=7):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _with_bundle(path, extra):
    sd, meta = load_file(path)
    return save_safetensors({**sd, **extra}, path.with_name(path.stem + "-emb.safetensors"), metadata=meta)


# -- the core --------------------------------------------------------------------------------------


def test_parse_both_layouts_and_lora_tensors_unchanged(webui, sd1_map):
    plain = make_lora(webui.lora_dir / "plain.safetensors", sd1_map, metadata=SD1_META)
    vec = _vectors()
    bundled = _with_bundle(plain, {"bundle_emb.starry.string_to_param.*": vec.half()})
    a, b = load_network(plain), load_network(bundled)
    assert not b.unknown_keys and not b.errors
    assert set(a.adapters) == set(b.adapters)
    assert b.embeddings["starry"].vectors[""].dtype == torch.float32
    torch.testing.assert_close(b.embeddings["starry"].vectors[""], vec.half().float(), rtol=0, atol=0)
    assert b.embeddings["starry"].misfit({"": WIDTH}) is None
    assert "64" in b.embeddings["starry"].misfit({"": 64})
    assert "one-text-encoder model" in b.embeddings["starry"].misfit({"clip_l": 768, "clip_g": 1280})
    xl = parse_bundle("f", {"bundle_emb.x.clip_l": torch.zeros(3, 768), "bundle_emb.x.clip_g": torch.zeros(3, 1280)})
    assert xl["x"].count == 3 and xl["x"].width == 2048
    assert xl["x"].misfit({"clip_l": 768, "clip_g": 1280}) is None and xl["x"].misfit({"": 768})
    # a diffusers concept (one tensor under any other key), a single vector as [width]: the built-in reads it too
    concept = parse_bundle("f", {"bundle_emb.c.<c>": vec[0].half(), "bundle_emb.d.emb.params": vec})
    torch.testing.assert_close(concept["c"].vectors[""], vec[:1].half().float(), rtol=0, atol=0)
    assert concept["d"].vectors[""] is not vec and torch.equal(concept["d"].vectors[""], vec)


@pytest.mark.parametrize("tensors, words", [
    ({"bundle_emb.x.string_to_param.*": torch.tensor([[1.0, float("nan")]])}, "NaN"),
    ({"bundle_emb.x.string_to_param.*": torch.zeros(4)}, "[vectors, width]"),
    ({"bundle_emb.x.string_to_param.*": torch.zeros(1, 2, dtype=torch.int32)}, "float"),
    ({"bundle_emb.x.string_to_param.a": torch.zeros(1, 2), "bundle_emb.x.string_to_param.b": torch.zeros(1, 2)},
     "more than one"),
    ({"bundle_emb.x.string_to_param.*": torch.zeros(1, 2), "bundle_emb.x.concept": torch.zeros(1, 2)},
     "more than one"),
    ({"bundle_emb.x.clip_l": torch.zeros(1, 768)}, "both clip_l and clip_g"),
    ({"bundle_emb.x.clip_l": torch.zeros(1, 768), "bundle_emb.x.clip_g": torch.zeros(2, 1280)}, "vector counts"),
    ({"bundle_emb.x.string_to_param": torch.zeros(1, 2)}, "string_to_param.KEY"),
    ({"bundle_emb.x": torch.zeros(1, 2)}, "NAME.PART"),
    ({"bundle_emb.x.string_to_param.": torch.zeros(1, 2)}, "string_to_param.KEY"),
])
def test_malformed_bundle_refuses_the_file(tensors, words):
    with pytest.raises(LoraFileError, match="f: ") as e:
        parse_bundle("f", tensors)
    assert words in str(e.value)


# -- in the WebUI ----------------------------------------------------------------------------------


def _files(webui, sd1_map, vec):
    plain = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map, metadata=SD1_META)
    _with_bundle(plain, {"bundle_emb.starry.string_to_param.*": vec})
    return plain


def _started_with_folder_embedding(webui, model, name):
    """The WebUI started with ``model`` and an embedding ``name`` from the embeddings folder: (database, it)."""
    from modules.textual_inversion.textual_inversion import Embedding
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    db = sd_hijack.model_hijack.embedding_db
    folder = Embedding(torch.ones(1, WIDTH), name)
    db.register_embedding(folder, model)
    return db, folder


@pytest.mark.parametrize("builtin", [False, True])
def test_bundled_embedding_reaches_conditioning_and_is_gone_after(webui, model, sd1_map, builtin):
    vec = _vectors()
    _files(webui, sd1_map, vec)
    shared.sd_model = model
    if builtin:
        BuiltinLora(webui).load()
    webui.load_script()
    webui.start_ui()
    db = sd_hijack.model_hijack.embedding_db
    prompt = "a starry cat"
    baseline = encode_prompt(model, prompt)

    p = webui.generate(f"{prompt} <lora:tiny-emb:1>")
    assert not p.comments
    assert set(db.word_embeddings) == {"starry"}
    seen = []
    with_emb = encode_prompt(model, prompt, seen)
    assert len(seen) == 1 and seen[0][0] == 2                    # after the start token and "a"
    torch.testing.assert_close(seen[0][1], vec, rtol=0, atol=0)   # the vectors written into the file
    # same LoRA without the bundle: same weights merged, but "starry" is an ordinary word
    webui.workshop.deactivate(p)
    assert db.word_embeddings == {} and db.ids_lookup == {}       # nothing stays between generations
    webui.generate(f"{prompt} <lora:tiny:1>")
    without_emb = encode_prompt(model, prompt)
    assert with_emb.shape[1] == without_emb.shape[1] + 1                # two vectors in place of one word
    assert not torch.allclose(with_emb[0, 2], without_emb[0, 2])      # CLIP is causal: from there on
    webui.generate(prompt)                                       # no LoRA: nothing registered, model restored
    assert db.word_embeddings == {}
    torch.testing.assert_close(encode_prompt(model, prompt), baseline, rtol=0, atol=0)


def test_failed_generation_leaves_nothing_for_the_next_one(webui, model, sd1_map):
    """A generation that raises never reaches deactivate; the next one's scripts.process (run before its
    batches, also where ``p.disable_extra_networks`` skips activate) takes ours out, and only ours."""
    _files(webui, sd1_map, _vectors())
    db, folder = _started_with_folder_embedding(webui, model, "moon")
    webui.generate("starry moon <lora:tiny-emb:1>")           # ... and then the sampler raised: no deactivate
    assert set(db.word_embeddings) == {"starry", "moon"}
    webui.process(object())                                    # the next generation, extra networks disabled
    assert db.word_embeddings == {"moon": folder}
    assert db.find_embedding_at_position(model.cond_stage_model.tokenize(["moon"])[0], 0)[0] is folder
    assert db.find_embedding_at_position(model.cond_stage_model.tokenize(["starry"])[0], 0)[0] is None


def test_ti_hashes_name_the_lora_and_follow_the_builtin_setting(webui, model, sd1_map):
    _files(webui, sd1_map, _vectors())
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    webui.generate("starry <lora:tiny-emb:1>")
    emb = sd_hijack.model_hijack.embedding_db.word_embeddings["starry"]
    assert emb.shorthash and f"starry: {emb.shorthash}" == "starry: tiny-emb"  # as sd_hijack_clip writes it
    shared.opts.data["lora_bundled_ti_to_infotext"] = False
    try:
        assert f"starry: {emb.shorthash}" == "starry: "
    finally:
        del shared.opts.data["lora_bundled_ti_to_infotext"]


def test_folder_embedding_wins_and_misfit_is_skipped_with_messages(webui, model, sd1_map):
    plain = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map, metadata=SD1_META)
    _with_bundle(plain, {"bundle_emb.starry.string_to_param.*": _vectors(),
                         "bundle_emb.wide.string_to_param.*": _vectors(width=64)})
    db, folder = _started_with_folder_embedding(webui, model, "starry")
    p = webui.generate("starry wide <lora:tiny-emb:1>")
    assert db.word_embeddings == {"starry": folder}
    text = " ".join(p.comments)
    assert "'starry' skipped" in text and "embeddings folder" in text
    assert "'wide' is 64 wide" in text and "are 32" in text
    # the misfit is listed as skipped, as the built-in lists it (what /sdapi/v1/embeddings shows), until
    # the next activation; the folder's name is not, since it is loaded
    assert list(db.skipped_embeddings) == ["wide"]
    wide = db.skipped_embeddings["wide"]
    assert (wide.shape, wide.vectors) == (64, 2) and torch.equal(wide.vec, _vectors(width=64))
    webui.workshop.deactivate(p)
    assert db.word_embeddings == {"starry": folder}              # not ours: left alone
    assert db.skipped_embeddings == {"wide": wide}
    db.skipped_embeddings["other"] = theirs = object()          # the database's own entry is never touched
    webui.workshop.deactivate(webui.generate("starry <lora:tiny:1>"))
    assert db.skipped_embeddings == {"other": theirs}


def test_malformed_bundle_is_a_message_and_generation_goes_on(webui, model, sd1_map):
    plain = make_lora(webui.lora_dir / "tiny.safetensors", sd1_map, metadata=SD1_META)
    _with_bundle(plain, {"bundle_emb.starry.string_to_param.*": torch.full((1, WIDTH), float("inf"))})
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    p = webui.generate("starry <lora:tiny-emb:1>")
    assert any("NaN or Inf" in c for c in p.comments)
    assert sd_hijack.model_hijack.embedding_db.word_embeddings == {}


def test_file_of_embeddings_alone_registers_them(webui, model, sd1_map):
    vec = _vectors(n=1)
    save_safetensors({"bundle_emb.starry.string_to_param.*": vec}, webui.lora_dir / "only.safetensors")
    shared.sd_model = model
    webui.load_script()
    webui.start_ui()
    p = webui.generate("starry <lora:only:1>")
    assert not p.comments
    emb = sd_hijack.model_hijack.embedding_db.word_embeddings["starry"]
    assert torch.equal(emb.vec, vec)
    assert emb.filename == f"{webui.lora_dir / 'only.safetensors'}/starry"  # what the TI page lists it by
    assert p.extra_generation_params.get("Lora hashes", "").startswith("only: ")




def test_token_widths_through_the_webuis_hijack(sd1):
    """sd_hijack wraps each token embedding in EmbeddingsWithFixes (the table in .wrapped): still found."""
    from torch import nn

    from lib_lora.hosts.webui_model import token_widths
    model, _ = sd1
    assert token_widths(model, "sd1") == {"": WIDTH}
    embeddings = model.cond_stage_model.wrapped.transformer.text_model.embeddings
    table = embeddings.token_embedding
    fixes = nn.Module()
    fixes.wrapped = table
    embeddings.token_embedding = fixes
    try:
        assert token_widths(model, "sd1") == {"": WIDTH}
        assert token_widths(model, "sd3") is None
    finally:
        embeddings.token_embedding = table


def test_token_widths_sd2_open_clip():
    """SD2: cond_stage_model[.wrapped].model is open_clip, whose token table sd_hijack wraps the same way."""
    from torch import nn

    from lib_lora.hosts.webui_model import token_widths
    from webui_glue_support import FakeSdModel, FrozenOpenCLIPEmbedder, TinyOpenClip, WithCustomWords
    g = TinyOpenClip(width=24)
    fixes = nn.Module()
    fixes.wrapped = nn.Embedding(1000, 24)
    g.token_embedding = fixes
    sd2 = FakeSdModel(None, cond=WithCustomWords(FrozenOpenCLIPEmbedder(g)), is_sd2=True)
    assert token_widths(sd2, "sd2") == {"": 24}
    assert token_widths(FakeSdModel(None, cond=WithCustomWords(FrozenOpenCLIPEmbedder(TinyOpenClip(width=24))),
                                    is_sd2=True), "sd2") is None    # no token table found: unknown, not a guess


def test_sdxl_embedding_registered_with_both_encoders_vectors(standin_webui):
    """SDXL: clip_l/clip_g checked against each encoder's token table, registered as the WebUI's SDXL embedding
    (``vec`` a dict by encoder, ``shape`` both widths); an SD1 embedding is skipped with a message."""
    from torch import nn

    from lib_lora.hosts.webui_embeddings import BundledEmbeddings
    from webui_glue_support import FakeSdModel, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, TinyOpenClip, \
        WithCustomWords, tiny_clip

    g = TinyOpenClip(width=16)
    g.token_embedding = nn.Embedding(1000, 16)
    conditioner = WithCustomWords(nn.Module())  # the WebUI's cond_stage_model for SDXL: the conditioner, tokenize
    conditioner.embedders = nn.ModuleList([WithCustomWords(FrozenCLIPEmbedder(tiny_clip())),
                                           WithCustomWords(FrozenOpenCLIPEmbedder(g))])
    sdxl = FakeSdModel(None, conditioner=conditioner, is_sdxl=True)
    sdxl.cond_stage_model = conditioner
    l, gv = _vectors(n=3), _vectors(n=3, width=16, seed=8)
    embs = parse_bundle("xl", {"bundle_emb.sky.clip_l": l, "bundle_emb.sky.clip_g": gv,
                               "bundle_emb.old.string_to_param.*": _vectors()})
    reg = BundledEmbeddings(lambda key, default=None: default)
    messages = reg.register(sdxl, [("xl", embs["sky"]), ("xl", embs["old"])])
    db = sd_hijack.model_hijack.embedding_db
    emb = db.word_embeddings["sky"]
    assert set(emb.vec) == {"clip_l", "clip_g"} and emb.shape == WIDTH + 16 and emb.vectors == 3
    assert torch.equal(emb.vec["clip_l"], l) and torch.equal(emb.vec["clip_g"], gv)
    assert messages == ["xl: embedding 'old' is for a one-text-encoder model (SD1/SD2), not the loaded model — skipped"]
    reg.clear(None)                                            # no model to tokenize with: kept for later
    assert set(db.word_embeddings) == {"sky"}
    reg.clear(sdxl)
    assert db.word_embeddings == {} and db.ids_lookup == {}
