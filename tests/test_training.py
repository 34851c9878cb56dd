"""Training on tiny real-structure models: it learns, saves what others load, resumes exactly,
and leaves the host model exactly as it was whatever happens."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from lib_lora.fileio import load_safetensors
from lib_lora.library import Library
from lib_lora.modelmap import ModelMap
from lib_lora.network import load_network
from lib_lora.patcher import Patcher
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.network import NetworkConfig
from lib_lora.training.plan import make_plan
from lib_lora.training.state import state_path
from lib_lora.training.trainer import Callbacks, Trainer
from loras import activation, same, snapshot
from tiny_models import build_sd1, build_sd2, build_sdxl
from train_support import make_dataset, trainable


def config(tmp_path, **kw) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists():  # rewriting the images would (rightly) invalidate cached latents
        make_dataset(data)
    ds = DatasetConfig(data, resolution=64, min_bucket_reso=64, max_bucket_reso=128, enable_buckets=False)
    net = kw.pop("network", NetworkConfig(rank=4, alpha=4, train_text_encoder=True))
    base = dict(output_dir=tmp_path / "out", output_name="t", max_train_steps=8, learning_rate=2e-3,
                save_precision="fp32", seed=1)
    base.update(kw)
    return TrainConfig(ds, net, **base)


def fixed_loss(model, trainer_inputs, n=8, seed=0) -> float:
    """Denoising loss on the training latents at fixed noise/timesteps (our yardstick)."""
    lat, cond = trainer_inputs
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(n):
            noise = torch.randn(lat.shape, generator=g)
            t = torch.randint(100, 900, (lat.shape[0],), generator=g)
            acp = model.alphas_cumprod[t].view(-1, 1, 1, 1)
            pred = model.predict(acp.sqrt() * lat + (1 - acp).sqrt() * noise, t, cond)
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / n


def module_state(tiny):
    mods = [tiny.unet] + [m for _, m in tiny.text_encoders]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for mod in mods for m in mod.modules())
    param = [(n, p.requires_grad) for mod in mods for n, p in mod.named_parameters()]
    classes = [type(m).__name__ for mod in mods for m in mod.modules()]
    return hooks, param, classes


def test_loss_drops_and_file_round_trips(tmp_path, vae):
    tiny = build_sd1(seed=0)
    model = trainable(tiny, vae)
    before = snapshot(tiny.unet, tiny.text_encoders[0][1])
    state0 = module_state(tiny)
    # LoCon (resnet convs too) at a high rate: a random tiny UNet has everything to learn
    cfg = config(tmp_path, max_train_steps=60, learning_rate=5e-3,
                 network=NetworkConfig(rank=8, alpha=8, conv_rank=4, conv_alpha=4))
    plan = make_plan(cfg)
    summary = plan.summary
    tr = Trainer(model, plan, Callbacks(log=lambda s: None))
    assert summary["steps_per_epoch"] == 8
    ds = tr.dataset
    pixels = torch.stack([ds.load_image(i) for i in ds.items])
    with torch.no_grad():
        yard = (model.encode_images(pixels), model.encode_text([i.caption for i in ds.items]))
    base_loss = fixed_loss(model, yard)
    res = tr.run()
    assert res.steps == 60 and not res.stopped and res.output.exists()
    assert same(before, snapshot(tiny.unet, tiny.text_encoders[0][1]))  # training never writes the model
    assert module_state(tiny) == state0                                   # no hooks, flags, classes left

    # our runtime merges the file: the model now behaves as during training, and learned the data
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    p = Patcher(mm)
    rep = p.apply([activation(load_network(res.output))])
    assert not rep.messages
    with torch.no_grad():
        yard_te = (yard[0], model.encode_text([i.caption for i in ds.items]))
    trained_loss = fixed_loss(model, yard_te)
    p.restore()
    assert trained_loss < 0.6 * base_loss, (base_loss, trained_loss)  # measured 0.38x


def test_saved_file_matches_diffusers_and_metadata(tmp_path, vae):
    from tiny_models import diffusers_fused_weights, ldm_name_to_diffusers_map
    tiny = build_sd1(seed=1)
    tr = Trainer(trainable(tiny, vae), make_plan(config(tmp_path, max_train_steps=3)), Callbacks(log=lambda s: None))
    out = tr.run().output
    sd, meta = load_safetensors(out)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert any("_attentions_" in k for k in sd) and any("self_attn_q_proj" in k for k in sd)
    # diffusers loads the same file into its own pipeline and fuses the same weights we merge
    ref = diffusers_fused_weights(tiny, sd, scale=1.0)
    mm = ModelMap.build("sd1", tiny.unet, tiny.text_encoders)
    p = Patcher(mm)
    p.apply([activation(load_network(out))])
    names = ldm_name_to_diffusers_map(tiny)
    for k, v in tiny.unet.state_dict().items():
        torch.testing.assert_close(v, ref[f"unet.{names[k]}"], rtol=1e-5, atol=1e-6)
    for k, v in tiny.text_encoders[0][1].state_dict().items():
        if f"text_encoder.{k}" in ref:
            torch.testing.assert_close(v, ref[f"text_encoder.{k}"], rtol=1e-5, atol=1e-6)
    p.restore()
    # kohya's metadata, parseable, with hashes that match the file
    for key in ("ss_session_id", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_tag_frequency",
                "ss_dataset_dirs", "ss_resolution", "ss_steps", "ss_optimizer", "ss_sd_model_name",
                "ss_base_model_version", "sshs_model_hash", "sshs_legacy_hash", "modelspec.architecture",
                "modelspec.date", "modelspec.title", "modelspec.resolution", "ss_training_started_at"):
        assert key in meta, key
    assert json.loads(meta["ss_tag_frequency"]) == {"2_zkx": {"zkx": 4, "red square": 4, "grey background": 4}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_zkx": {"n_repeats": 2, "img_count": 4}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    entry = Library([out.parent]).resolve("t")
    assert meta["sshs_model_hash"] == __import__("lib_lora.hashes").hashes.addnet_hash_safetensors(out)
    assert entry.family == "sd1"


@pytest.mark.parametrize("ema", [None, 0.7])
def test_resume_equals_uninterrupted(tmp_path, vae, ema):
    tiny = build_sd1(seed=2)
    quiet = Callbacks(log=lambda s: None)
    run_config = functools.partial(config, ema_decay=ema)  # with EMA, the saves hold the average
    one = Trainer(trainable(tiny, vae), make_plan(run_config(tmp_path / "a", max_train_steps=6)), quiet).run()

    def stop_after_3(prog):
        if prog.step == 3:
            first.request_stop()
    first = Trainer(trainable(tiny, vae), make_plan(run_config(tmp_path / "b", max_train_steps=6,
                                                               save_every_n_steps=3, save_state=True)),
                    Callbacks(on_progress=stop_after_3, log=lambda s: None))
    r1 = first.run()
    assert r1.stopped and r1.output is None
    state = state_path(first.output_path(3))
    assert state.exists()
    second = Trainer(trainable(tiny, vae), make_plan(run_config(tmp_path / "b", max_train_steps=6), state), quiet)
    r2 = second.run()
    a, b = load_safetensors(one.output)[0], load_safetensors(r2.output)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert r2.losses == one.losses


@pytest.mark.parametrize("how", ["stop", "stop_and_save", "crash"])
def test_model_restored_after_stop_or_crash(tmp_path, vae, how):
    tiny = build_sd2(seed=0)  # OpenCLIP: fused q/k/v go through parametrizations
    model = trainable(tiny, vae)
    before = snapshot(tiny.unet, tiny.text_encoders[0][1])
    state0 = module_state(tiny)
    stop = (lambda p: tr.request_stop(save=how == "stop_and_save") if p.step == 2 else None) if how != "crash" else None
    tr = Trainer(model, make_plan(config(tmp_path, max_train_steps=10)),
                 Callbacks(on_progress=stop, log=lambda s: None))
    if how == "crash":
        real = model.predict
        n = {"calls": 0}

        def flaky(*a, **k):
            n["calls"] += 1
            if n["calls"] == 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real(*a, **k)
        model.predict = flaky
        with pytest.raises(RuntimeError, match="simulated"):
            tr.run()
    else:
        res = tr.run()
        assert res.stopped and res.steps == 2
        assert (res.output is not None) == (how == "stop_and_save")
        if res.output:
            keys = load_safetensors(res.output)[0].keys()
            assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight" in keys
            assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in keys
    assert same(before, snapshot(tiny.unet, tiny.text_encoders[0][1]))
    assert module_state(tiny) == state0


def test_sdxl_trains_both_encoders_in_sgm_names(tmp_path, vae):
    tiny = build_sdxl(seed=0)
    before = snapshot(tiny.unet, *[m for _, m in tiny.text_encoders])
    res = Trainer(trainable(tiny, vae), make_plan(config(tmp_path, max_train_steps=2)),
                  Callbacks(log=lambda s: None)).run()
    sd, meta = load_safetensors(res.output)
    prefixes = {k.split("_text_model")[0] for k in sd if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_") for k in sd)
    assert not any(k.startswith("lora_unet_down_blocks") for k in sd)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert load_network(res.output).family == "sdxl"
    assert same(before, snapshot(tiny.unet, *[m for _, m in tiny.text_encoders]))


def test_existing_output_is_not_overwritten(tmp_path, vae):
    cfg = config(tmp_path, max_train_steps=1)
    cfg_out = tmp_path / "out"
    cfg_out.mkdir(parents=True)
    (cfg_out / "t.safetensors").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        make_plan(cfg)
    assert (cfg_out / "t.safetensors").read_bytes() == b"precious"


def test_gradient_checkpointing_and_disk_latents_change_nothing_but_cost(tmp_path, vae):
    """Same file with activations recomputed and latents read back from disk."""
    tiny = build_sd1(seed=4)
    quiet = Callbacks(log=lambda s: None)
    plain = Trainer(trainable(tiny, vae), make_plan(config(tmp_path / "a", max_train_steps=8)), quiet).run().output
    cfg = config(tmp_path / "b", max_train_steps=8, gradient_checkpointing=True, cache_latents_to_disk=True)
    first = Trainer(trainable(tiny, vae), make_plan(cfg), quiet).run().output
    cached = sorted(p.name for p in (tmp_path / "b" / "data" / "2_zkx").glob("*.lwlatent"))
    assert cached == [f"img_{i}.64x64.lwlatent" for i in range(4)]
    encode_calls = {"n": 0}
    model = trainable(tiny, vae)
    real = model.encode_images
    model.encode_images = lambda px: (encode_calls.__setitem__("n", encode_calls["n"] + 1), real(px))[1]
    cfg2 = config(tmp_path / "b", max_train_steps=8, gradient_checkpointing=True, cache_latents_to_disk=True,
                  output_name="again")
    again = Trainer(model, make_plan(cfg2), quiet).run().output
    assert encode_calls["n"] == 0  # every latent came from disk
    a, b, c = (load_safetensors(p)[0] for p in (plain, first, again))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
        assert torch.equal(b[k], c[k])


def test_trains_on_the_torch_api_of_webui_1_10(tmp_path, vae, monkeypatch):
    """WebUI 1.10 installs torch 2.1: no torch.amp.GradScaler (2.3) and no device-type autocast
    queries (2.4).  Without them, a run with LoCon (rebuilt activations) still trains, and the
    same as with them."""
    cfg = dict(max_train_steps=2, network=NetworkConfig(rank=4, alpha=4, conv_rank=4, conv_alpha=4),
               lean_frozen_layers=True)    # tiny models are not lean by default
    with_new = Trainer(trainable(build_sd1(), vae), make_plan(config(tmp_path / "a", **cfg)),
                       Callbacks(log=lambda s: None)).run()
    monkeypatch.delattr(torch.amp, "GradScaler")
    monkeypatch.setattr("lib_lora.autocast.BY_DEVICE_TYPE", False)
    cfg["network"] = NetworkConfig(rank=4, alpha=4, conv_rank=4, conv_alpha=4)   # config() pops it
    old = Trainer(trainable(build_sd1(), vae), make_plan(config(tmp_path / "b", **cfg)),
                  Callbacks(log=lambda s: None)).run()
    a, _ = load_safetensors(with_new.output)
    b, _ = load_safetensors(old.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_model_without_autocast_is_refused_untouched(tmp_path, vae, dtype):
    """A half UNet computes only under CUDA autocast; elsewhere the run stops before it begins."""
    tiny = build_sd1(seed=0)
    for m in [tiny.unet] + [te for _, te in tiny.text_encoders]:
        m.to(dtype)
    before = snapshot(tiny.unet, tiny.text_encoders[0][1])
    state0 = module_state(tiny)
    tr = Trainer(trainable(tiny, vae), make_plan(config(tmp_path, max_train_steps=2, mixed_precision="fp16")),
                 Callbacks(log=lambda s: None))
    with pytest.raises(ValueError, match=f"weights are {str(dtype)[6:]}: .*mixed precision fp16 or bf16 on a CUDA"):
        tr.run()
    assert not (tmp_path / "out" / "t.safetensors").exists()
    assert same(before, snapshot(tiny.unet, tiny.text_encoders[0][1])) and module_state(tiny) == state0


def test_lora_under_autocast_reads_the_half_input_as_it_is(monkeypatch):
    """The LoRA beside a frozen layer, under autocast: the same numbers as casting the half input
    to the fp32 LoRA weight first (autocast casts it straight back), without that layer-wide copy
    being made and kept for backward."""
    from lib_lora.adapters.lora import LoRAModule

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).requires_grad_(False)
    lora = LoRAModule("l", layer, layer.weight.shape, rank=4, alpha=2)
    torch.nn.init.normal_(lora.up.weight)
    x = torch.randn(2, 16, 64).to(torch.bfloat16).requires_grad_(True)

    def step():
        kept = []
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = lora.add_to(layer(x), x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, lora.down.weight, lora.up.weight])
        own = x.untyped_storage().data_ptr()
        copies = [t for t in kept if t.numel() == x.numel() and t.untyped_storage().data_ptr() != own]
        return out, grads, copies

    out, grads, copies = step()
    monkeypatch.setattr("lib_lora.adapters.lora.autocasting", lambda dev: False)   # cast x to fp32 first
    out_cast, grads_cast, copies_cast = step()
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_cast)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast))
    assert not copies and len(copies_cast) == 1


def test_adamw_runs_fused_where_torch_has_it_unless_the_user_chose():
    from torch.utils import _foreach_utils

    from lib_lora.training.optim import make_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    cfg = TrainConfig(DatasetConfig("unused"), NetworkConfig())
    opt, _ = make_optimizer("AdamW", [{"params": [p]}], cfg)
    fused = "cpu" in getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: [])()
    assert opt.param_groups[0]["fused"] is (True if fused else None)
    cfg = TrainConfig(DatasetConfig("unused"), NetworkConfig(), optimizer_args={"foreach": True})
    opt, _ = make_optimizer("AdamW", [{"params": [p]}], cfg)
    assert not opt.param_groups[0]["fused"] and opt.param_groups[0]["foreach"] is True


def test_a_resumed_run_uses_this_torchs_adamw_kernel(tmp_path, vae, monkeypatch):
    """A state saved by a run with the fused AdamW resumes where torch has none for the device."""
    import lib_lora.training.optim as optim_module

    tiny = build_sd1(seed=2)
    cfg = dict(max_train_steps=4, save_every_n_steps=2, save_state=True)
    first = Trainer(trainable(tiny, vae), make_plan(config(tmp_path, **cfg)), Callbacks(log=lambda s: None))
    first.run()
    monkeypatch.setattr(optim_module, "adamw_kernel", lambda groups: {})
    kernels = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: kernels.append(self.param_groups[0]["fused"]) or step(self, *a, **k))
    res = Trainer(trainable(tiny, vae), make_plan(config(tmp_path, output_name="again", max_train_steps=4),
                                                  state_path(first.output_path(2))), Callbacks(log=lambda s: None)).run()
    assert res.steps == 4 and kernels == [None, None]


def test_the_dropout_seed_is_manual_seeds_and_the_global_rng_is_left_alone():
    """The step seeds torch's global CPU generator as ``torch.manual_seed`` would, and puts it back."""
    from lib_lora.training.trainer import _global_rng_seeded

    torch.manual_seed(7)
    expected = torch.rand(5)
    state = torch.get_rng_state()
    with _global_rng_seeded(torch.device("cpu"), 7):
        assert torch.equal(torch.rand(5), expected)
    assert torch.equal(torch.get_rng_state(), state)

