"""The CLI's checkpoint host: single-file save/load, config inference, tokenizer, conditioning, samplers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import tiny_models as tm
from lib_lora.fileio import read_header, save_safetensors
from lib_lora.hashes import addnet_hash_legacy, sha256_file
from lib_lora.hosts.cli.builders import build_text_encoder, build_unet
from lib_lora.hosts.cli.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from lib_lora.hosts.cli.config import TEXT_LAYOUT, UNET_PREFIX, VAE_PREFIX, ArchitectureError, infer_config
from lib_lora.hosts.cli.sampling import alphas_cumprod, sample, sample_latents
from lib_lora.hosts.cli.tokenizer import BOS, EOS, clip_chunk_tokenize, clip_tokenize
from lib_lora.hosts.cli.vae import ldm_vae_layout

BUILD = {"sd1": tm.build_sd1, "sd2": tm.build_sd2, "sdxl": tm.build_sdxl}
PREDICTION = {"sd1": "epsilon", "sd2": "v", "sdxl": "epsilon"}  # sd2 exercises the v path end to end
PX = 16  # image side: the toy VAE halves it to the 8x8 latent the toy UNets need


def tiny_vae():
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # two levels: a real downsampler, and 32 -> 64 channels so the ldm file has nin_shortcut convs
        vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return vae.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (tiny model, in-memory Checkpoint, file with yaml, copy without yaml), fp32."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    vae = tiny_vae()
    for family, build in BUILD.items():
        tiny = build()
        ck = Checkpoint.from_modules(family, tiny.unet, tiny.text_encoders, vae, prediction=PREDICTION[family])
        path = save_checkpoint(ck, root / family / f"tiny-{family}.safetensors", dtype=torch.float32)
        bare = root / f"{family}-bare" / path.name
        bare.parent.mkdir()
        shutil.copy(path, bare)
        out[family] = (tiny, ck, path, bare)
    return out


def unet_out(unet, family: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, tm.LATENT_SIZE, tm.LATENT_SIZE, generator=g)
    width = {"sd1": tm.CLIP_WIDTH, "sd2": tm.OPENCLIP_WIDTH, "sdxl": tm.CLIP_WIDTH + tm.OPENCLIP_WIDTH}[family]
    ctx = torch.randn(2, 77, width, generator=g)
    kw = {"y": torch.randn(2, tm.SDXL_ADM_IN, generator=g)} if family == "sdxl" else {}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 900]), context=ctx, **kw)


def assert_same_weights(a: Checkpoint, b: Checkpoint) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]
    assert all(torch.equal(v, b.vae.state_dict()[k]) for k, v in a.vae.state_dict().items())


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", BUILD)
def test_round_trip_with_yaml(saved, family):
    tiny, ck, path, _ = saved[family]
    loaded = load_checkpoint(path)
    assert loaded.config_source == "yaml" and loaded.family == family
    if family == "sdxl":  # sgm's UNet has no (unused) image_size argument, so the yaml has none
        assert loaded.config["unet"].pop("image_size") == 32
        loaded.config["unet"]["image_size"] = tm.LATENT_SIZE
    assert loaded.config == ck.config and loaded.prediction == PREDICTION[family]
    assert_same_weights(ck, loaded)
    assert torch.equal(unet_out(loaded.unet, family), unet_out(tiny.unet, family))
    assert type(loaded.unet).__name__ == type(tiny.unet).__name__
    assert [(p, type(m).__name__) for p, m in loaded.text_encoders] == \
        [(p, type(m).__name__) for p, m in tiny.text_encoders]

    doc = yaml.safe_load(path.with_suffix(".yaml").read_text())
    params = doc["model"]["params"]
    if family == "sdxl":
        assert doc["model"]["target"] == "sgm.models.diffusion.DiffusionEngine"
        assert params["network_config"]["params"]["model_channels"] == tm.MODEL_CHANNELS
        assert params["scale_factor"] == 0.13025
        embedders = params["conditioner_config"]["params"]["emb_models"]
        assert [e["target"].rsplit(".", 1)[1] for e in embedders] == \
            ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"] + ["ConcatTimestepEmbedderND"] * 3
        assert embedders[2]["params"]["outdim"] == tm.SDXL_TIME_EMBED_DIM
    else:
        assert doc["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
        assert params["unet_config"]["params"]["context_dim"] == tiny.config["context_dim"]
        assert params["cond_stage_config"]["target"].endswith(
            "FrozenCLIPEmbedder" if family == "sd1" else "FrozenOpenCLIPEmbedder")
        assert params.get("parameterization", "eps") == ("v" if PREDICTION[family] == "v" else "eps")
        assert params["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 2]


@pytest.mark.parametrize("family", BUILD)
def test_shape_inference(saved, family):
    tiny, ck, _, bare = saved[family]
    loaded = load_checkpoint(bare)
    assert loaded.config_source == "inferred"
    assert_same_weights(ck, loaded)
    inferred = dict(loaded.config["unet"])
    assert inferred.pop("image_size") == 32
    assert inferred == {k: v for k, v in tiny.config.items() if k != "image_size"}
    assert loaded.config["text_encoders"] == ck.config["text_encoders"]  # toy widths: 2 heads
    assert loaded.config["vae"] == ck.config["vae"]
    if family == "sdxl":
        assert loaded.config["size_embed_dim"] == tm.SDXL_TIME_EMBED_DIM
    assert torch.equal(unet_out(loaded.unet, family), unet_out(tiny.unet, family))
    if family == "sd2":  # decided by running the UNet, as the WebUI does; a random toy UNet gives either answer
        assert loaded.prediction in ("epsilon", "v")
        forced = load_checkpoint(bare, config={"prediction": "v"})
        assert forced.prediction == "v" and forced.config_source == "inferred+explicit"


def test_explicit_config_and_clear_errors(saved, tmp_path):
    _, ck, _, bare = saved["sd1"]
    full = load_checkpoint(bare, config=ck.config)
    assert full.config_source == "explicit" and full.config == ck.config
    with pytest.raises(ArchitectureError, match="UNet weights do not match the inferred\\+explicit config"):
        load_checkpoint(bare, config={"unet": {"model_channels": 64}})
    with pytest.raises(ArchitectureError, match="te weights do not match"):
        load_checkpoint(bare, config={"text_encoders": [{"layers": 3}]})

    lora = save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ArchitectureError, match="cannot infer architecture: no UNet"):
        load_checkpoint(lora)
    sd = {k: v for k, v in ck.state_dict().items() if not k.startswith("cond_stage_model.")}
    save_safetensors(sd, tmp_path / "no-te.safetensors")
    with pytest.raises(ArchitectureError, match="cannot infer architecture: no known text-encoder keys"):
        load_checkpoint(tmp_path / "no-te.safetensors")
    sd = {k: v for k, v in ck.state_dict().items() if not k.startswith("first_stage_model.")}
    save_safetensors(sd, tmp_path / "no-vae.safetensors")
    with pytest.raises(ArchitectureError, match="cannot infer architecture: no VAE"):
        load_checkpoint(tmp_path / "no-vae.safetensors")
    with pytest.raises(FileExistsError):
        save_checkpoint(ck, bare)


def test_fp16_file_layout(saved, tmp_path):
    tiny, ck, _, _ = saved["sd1"]
    path = save_checkpoint(ck, tmp_path / "half.safetensors", yaml=False)  # default fp16
    h = read_header(path)
    assert {v["dtype"] for v in h.tensors.values()} == {"F16"}
    assert h.metadata["modelspec.architecture"] == "stable-diffusion-v1"
    # ldm VAE names and shapes, as real files: attention as 1x1 convs, nin_shortcut where widths change
    assert h.shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in h.shapes
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in h.shapes
    assert h.shapes["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == \
        (tm.VOCAB_SIZE, tm.CLIP_WIDTH)
    loaded = load_checkpoint(path)
    assert next(loaded.unet.parameters()).dtype == torch.float32
    torch.testing.assert_close(unet_out(loaded.unet, "sd1"), unet_out(tiny.unet, "sd1"), atol=2e-2, rtol=2e-2)


def test_real_layouts_are_inferred():
    """Full-size SD1 / SD2 / SDXL layouts (meta tensors, no memory) give the published configs."""
    from lib_lora.architectures import CLIP_L, OPEN_CLIP_H, SD1_UNET, SD2_UNET

    sdxl_unet = dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
                     attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                     use_linear_in_transformer=True, transformer_depth=[0, 2, 10], transformer_depth_middle=10,
                     context_dim=2048, legacy=False, use_spatial_transformer=True, image_size=32)
    clip_l = dict(kind="hf_clip", width=768, layers=12, heads=12, vocab_size=49408, context_length=77,
                  intermediate=3072, act="quick_gelu")
    open_clip = dict(kind="open_clip", layers=24, heads=16, vocab_size=49408, context_length=77, mlp_ratio=4.0)
    vae = {"embed_dim": 4, "ddconfig": dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3,
                                            ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[],
                                            dropout=0.0)}
    cases = {"sd1": (SD1_UNET, [dict(clip_l, prefix="te")]),
             "sd2": (SD2_UNET, [dict(open_clip, prefix="te", width=1024, embed_dim=1024)]),
             "sdxl": (sdxl_unet, [dict(clip_l, prefix="te1"),
                                  dict(open_clip, prefix="te2", width=1280, layers=32, heads=20, embed_dim=1280)])}
    assert CLIP_L["num_attention_heads"] == 12 and OPEN_CLIP_H["heads"] == 16
    layout = ldm_vae_layout(vae)
    for family, (unet_cfg, tes) in cases.items():
        with torch.device("meta"):
            sd = {UNET_PREFIX + k: v for k, v in build_unet(unet_cfg).state_dict().items()}
            for t, (_, file_prefix, _) in zip(tes, TEXT_LAYOUT[family]):
                sd |= {file_prefix + k: v for k, v in build_text_encoder(t).state_dict().items()}
        sd |= {VAE_PREFIX + k: torch.empty(s, device="meta") for k, s in layout.items()}
        cfg = infer_config(sd)
        assert cfg["family"] == family
        assert cfg["unet"] == dict(unet_cfg, use_checkpoint=False, image_size=32), family
        assert cfg["text_encoders"] == tes and cfg["vae"] == vae
        assert cfg["scale_factor"] == (0.13025 if family == "sdxl" else 0.18215)
        assert cfg.get("size_embed_dim") == (256 if family == "sdxl" else None)
    assert sum(v.numel() for k, v in sd.items() if k.startswith(UNET_PREFIX)) == 2_567_463_684  # SDXL UNet


# --------------------------------------------------------------------------- tokenizer and conditioning

PROMPTS = ["a photo of a CAT, sitting on a mat!", "masterpiece, (best quality:1.2), 1girl, blue_hair",
           "  spaced \t out\n text  ", "", "tokens " * 100]


def test_tokenizer_matches_hf_clip_and_open_clip(tmp_path):
    import open_clip
    import transformers
    from open_clip.tokenizer import SimpleTokenizer

    # HF's CLIPTokenizer for openai/clip-vit-large-patch14, rebuilt offline from the same BPE files
    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in bpe.encoder.items()}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                    pad_token="<|endoftext|>")
    expected = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids = clip_tokenize(PROMPTS, pad_id=EOS)
    assert torch.equal(ids, expected)
    assert ids[0, 0] == BOS and ids[-1, -1] == EOS and (ids[3, 1:] == EOS).all()  # "" -> BOS, EOS * 76
    assert torch.equal(clip_tokenize(PROMPTS, pad_id=0), open_clip.tokenize(PROMPTS))


def test_long_prompts_are_cut_into_chunks_like_the_webui():
    from open_clip.tokenizer import SimpleTokenizer
    enc = SimpleTokenizer().encoder
    cat, dog, comma = enc["cat</w>"], enc["dog</w>"], enc[",</w>"]

    def chunk(ids: list[int], pad: int) -> list[int]:
        return [BOS, *ids, EOS] + [pad] * (75 - len(ids))

    # one chunk: exactly the single-chunk tokenizer
    assert torch.equal(clip_chunk_tokenize(PROMPTS, EOS)[:, 0], clip_tokenize(PROMPTS, EOS))
    # 100 tokens: 75 + 25; the short prompt gets an empty second chunk (what "" encodes to)
    ids = clip_chunk_tokenize(["cat " * 100, "dog"], 0)
    assert ids.shape == (2, 2, 77)
    assert ids[0].tolist() == [chunk([cat] * 75, 0), chunk([cat] * 25, 0)]
    assert ids[1].tolist() == [chunk([dog], 0), chunk([], 0)]
    # a boundary 5 tokens after a comma moves the words after the comma to the next chunk
    ids = clip_chunk_tokenize(["cat " * 70 + ", " + "dog " * 10], EOS)
    assert ids[0].tolist() == [chunk([cat] * 70 + [comma], EOS), chunk([dog] * 10, EOS)]
    ids = clip_chunk_tokenize(["cat " * 70 + ", " + "dog " * 10], EOS, comma_backtrack=0)
    assert ids[0].tolist() == [chunk([cat] * 70 + [comma] + [dog] * 4, EOS), chunk([dog] * 6, EOS)]


@pytest.mark.parametrize("family", BUILD)
def test_long_prompt_conditioning_is_its_chunks_side_by_side(saved, family):
    _, ck, _, _ = saved[family]
    with torch.no_grad():
        both = ck.encode_text(["cat " * 100, "dog"])
        first, second, dog, empty = (ck.encode_text([p]) for p in ("cat " * 75, "cat " * 25, "dog", ""))
    assert both.context.shape[1] == 154
    torch.testing.assert_close(both.context[:1], torch.cat([first.context, second.context], 1))
    torch.testing.assert_close(both.context[1:], torch.cat([dog.context, empty.context], 1))
    if family == "sdxl":   # the pooled embedding comes from the first chunk
        torch.testing.assert_close(both.y, torch.cat([first.y, dog.y]))


def _reference_conditioning(tiny, prompts, sizes):
    """Independent of the host: tiny_models' own open_clip_forward / sdxl_y and HF's CLIPTextModel."""
    import open_clip

    oc_tokens = open_clip.tokenize(prompts)
    hf_tokens = torch.where(oc_tokens == 0, EOS, oc_tokens)  # FrozenCLIPEmbedder pads with EOS
    if tiny.family == "sd1":
        return tiny.text_encoders[0][1](input_ids=hf_tokens).last_hidden_state, None
    if tiny.family == "sd2":
        te = tiny.text_encoders[0][1]
        return te.ln_final(tm.open_clip_forward(te, oc_tokens)["hidden_states"][-2]), None
    h1 = tiny.text_encoders[0][1](input_ids=hf_tokens, output_hidden_states=True).hidden_states[-2]
    out = tm.open_clip_forward(tiny.text_encoders[1][1], oc_tokens)
    ids = torch.tensor([[*o, *c, *t] for o, c, t in sizes], dtype=torch.float32)
    return torch.cat([h1, out["hidden_states"][-2]], -1), tm.sdxl_y(out["text_embeds"], ids)


@pytest.mark.parametrize("family", BUILD)
def test_encode_text_matches_embedders_and_trains(saved, family):
    tiny, ck, _, _ = saved[family]
    prompts, sizes = PROMPTS[:2], [((64, 48), (4, 0), (32, 32)), ((16, 16), (0, 0), (16, 16))]
    with torch.no_grad():
        cond = ck.encode_text(prompts, sizes)
        context, y = _reference_conditioning(tiny, prompts, sizes)
    torch.testing.assert_close(cond.context, context)
    assert (cond.y is None) == (y is None)
    if y is not None:
        torch.testing.assert_close(cond.y, y)

    loaded = load_checkpoint(saved[family][2])  # loaded frozen; gradients flow once a text encoder trains
    assert not any(p.requires_grad for m in loaded.modules() for p in m.parameters())
    te = loaded.text_encoders[-1][1].requires_grad_(True)
    c = loaded.encode_text(prompts[:1])
    (c.context.square().mean() + (c.y.mean() if c.y is not None else 0)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in te.named_parameters() if ".resblocks.0." in n or ".layers.0." in n)


def test_trainable_wiring(saved):
    tiny, ck, path, _ = saved["sd1"]
    loaded = load_checkpoint(path)
    m = loaded.trainable(latent_sampling="mean")
    assert m.family == "sd1" and m.unet is loaded.unet and m.text_encoders[0][1] is loaded.text_encoders[0][1]
    assert m.model_name == path.stem and m.prediction == "epsilon" and len(m.model_map) > 0
    assert m.model_hash == sha256_file(path) and m.legacy_hash == addnet_hash_legacy(path)
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(m.alphas_cumprod, ref, atol=1e-6, rtol=1e-5)

    pixels = torch.rand(1, 3, PX, PX, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = m.encode_images(pixels)
    assert lat.shape == (1, 4, PX // 2, PX // 2)
    with torch.no_grad():
        torch.testing.assert_close(lat, loaded.vae.encode(pixels).latent_dist.mean * 0.18215)
    def seeded_sample():  # posterior samples come from the global RNG, which the trainer seeds per image
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return loaded.trainable().encode_images(pixels)
    sampled = [seeded_sample() for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], lat)
    assert m.decode_latents(lat).shape == (1, 3, PX, PX)
    with torch.no_grad():
        out = m.predict(lat, torch.tensor([500]), m.encode_text(["x"], None))
    assert out.shape == lat.shape
    images = m.render(["a"], seed=1, steps=2, width=PX, height=PX)
    assert images[0].size == (PX, PX)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_samplers_match_diffusers(sampler, prediction):
    """Our DDIM / Euler loops against diffusers' schedulers configured as SD / the WebUI use them."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    acp = alphas_cumprod()
    betas = 1 - acp / torch.cat([torch.ones(1), acp[:-1]])

    def model(x, t):  # any smooth function of (x, t) will do; t arrives as a float tensor
        return 0.7 * x + 0.001 * t.float().view(-1, 1, 1, 1) - 0.2

    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    steps = 10  # linspace(999, 0, 10) hits integer timesteps, where linear and log-sigma interpolation agree
    ours = sample_latents(model, noise, acp, steps, prediction, sampler)
    kw = dict(trained_betas=betas.numpy(), prediction_type={"v": "v_prediction"}.get(prediction, prediction))
    if sampler == "ddim":
        sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw)
    else:
        sch = EulerDiscreteScheduler(timestep_spacing="linspace", **kw)
    sch.set_timesteps(steps)
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(model(sch.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=2e-4, rtol=1e-4)


def test_sample_images(saved):
    _, sd1, _, _ = saved["sd1"]
    a = sample(sd1, ["red", "blue"], steps=3, seed=5, width=PX, height=PX)
    b = sample(sd1, ["red", "blue"], steps=3, seed=5, width=PX, height=PX)
    c = sample(sd1, ["red"], steps=3, seed=6, width=PX, height=PX)
    assert [im.size for im in a] == [(PX, PX)] * 2
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert a[0].tobytes() != c[0].tobytes() and a[0].tobytes() != a[1].tobytes()
    # image 0 of a batch equals a single image with the same seed (per-image noise)
    assert a[0].tobytes() == sample(sd1, "red", steps=3, seed=5, width=PX, height=PX)[0].tobytes()

    _, sd2, _, _ = saved["sd2"]  # v-prediction
    assert sd2.prediction == "v"
    e = sample(sd2, "x", negative="y", steps=3, sampler="euler", width=PX, height=PX)
    assert e[0].size == (PX, PX)
    _, sdxl, _, _ = saved["sdxl"]
    assert sample(sdxl, "x", steps=2, width=PX * 2, height=PX)[0].size == (PX * 2, PX)
    # a two-chunk prompt with a one-chunk negative: run apart (as the WebUI does); the second chunk counts
    long = sample(sd1, "cat " * 100, steps=2, seed=5, width=PX, height=PX)[0]
    assert long.tobytes() != sample(sd1, "cat " * 75, steps=2, seed=5, width=PX, height=PX)[0].tobytes()
    assert sample(sdxl, "cat " * 100, negative="dog", steps=2, width=PX, height=PX)[0].size == (PX, PX)
    with pytest.raises(ValueError, match="multiples of 16"):
        sample(sd1, "x", width=24, height=PX)
