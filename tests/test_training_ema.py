"""EMA of the LoRA weights (``ema_decay``): the average is the debiased exponential mean of the weights
each step left, it is what every save writes, and a resumed run continues it exactly."""
from __future__ import annotations

import pytest
import torch

from lib_lora.fileio import load_safetensors, read_header
from lib_lora.modelmap import ModelMap
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.ema import LoraEMA, decay_at
from lib_lora.training.flat_params import flatten
from lib_lora.training.network import NetworkConfig
from lib_lora.training.options import OptionError
from lib_lora.training.plan import make_plan
from lib_lora.training.state import load_state, state_path
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1
from train_support import make_dataset, trainable

QUIET = Callbacks(log=lambda s: None)


def closed_form(seq: list[torch.Tensor], d: float) -> torch.Tensor:
    """sum_i d^(N-i) (1-d) w_i / (1 - d^N), in float64: the zero-initialised average, bias-corrected."""
    n = len(seq)
    total = sum(d ** (n - i) * (1 - d) * w.double() for i, w in enumerate(seq, start=1))
    return total / (1 - d ** n)


def test_the_average_is_the_debiased_exponential_mean_of_the_weights_seen():
    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))
    flat = flatten([a, b])                      # the UNet's layout: members are views of one tensor
    te = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    ema = LoraEMA([flat, te], 0.9)
    seen: list[list[torch.Tensor]] = [[], [], []]
    for t in range(1, 26):
        with torch.no_grad():
            for p in (a, b, te):
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(t)
        for s, p in zip(seen, (a, b, te)):
            s.append(p.detach().clone())
    assert decay_at(0.9, 1) == 0.0 and abs(decay_at(0.9, 10_000) - 0.9) < 1e-12
    with ema.applied():
        for s, p in zip(seen, (a, b, te)):
            torch.testing.assert_close(p.detach().double(), closed_form(s, 0.9), rtol=1e-5, atol=1e-6)
    # and the weights themselves are back, bit for bit
    for s, p in zip(seen, (a, b, te)):
        assert torch.equal(p.detach(), s[-1])


def test_after_one_update_the_average_is_the_weights():
    p = torch.nn.Parameter(torch.zeros(4))
    ema = LoraEMA([p], 0.999)
    with torch.no_grad():
        p.add_(3.0)
    ema.update(1)
    assert torch.equal(ema.average[0], torch.full((4,), 3.0))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5])
def test_a_decay_outside_0_1_is_refused(tmp_path, bad):
    with pytest.raises(OptionError, match="ema_decay"):
        TrainConfig(DatasetConfig(tmp_path), ema_decay=bad)


def _config(tmp_path, out: str, **kw) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data)
    ds = DatasetConfig(data, resolution=64, enable_buckets=False)
    return TrainConfig(ds, NetworkConfig(rank=4, alpha=4, train_text_encoder=True), output_dir=tmp_path / out,
                       output_name="t", max_train_steps=6, learning_rate=2e-3, save_precision="fp32", seed=1, **kw)


def test_every_save_holds_the_average_and_the_state_the_weights(tmp_path, vae):
    tiny = build_sd1(seed=3)
    # without EMA, a file every step: the weights w_1 .. w_6 (EMA changes nothing of the training itself)
    raw = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "raw", save_every_n_steps=1)), QUIET).run()
    weights = [load_safetensors(p)[0] for p in raw.saved]
    assert len(weights) == 6
    ema = Trainer(trainable(tiny, vae), make_plan(_config(tmp_path, "ema", ema_decay=0.8, save_every_n_steps=3,
                                                          save_state=True)), QUIET).run()
    assert [p.name for p in ema.saved] == ["t-step00000003.safetensors", "t.safetensors"]
    for path, n in zip(ema.saved, (3, 6)):
        got = load_safetensors(path)[0]
        moved = 0
        for k, v in got.items():
            if k.endswith(".alpha"):
                continue
            torch.testing.assert_close(v.double(), closed_form([w[k] for w in weights[:n]], 0.8),
                                       rtol=1e-5, atol=1e-7)
            moved += not torch.equal(v, weights[n - 1][k])
        assert moved > len(got) // 2          # the average, not the last weights
        assert read_header(path).metadata["ss_ema_decay"] == "0.8"
    st = load_state(state_path(ema.saved[-1]))
    for k, v in weights[-1].items():
        if not k.endswith(".alpha"):
            assert torch.equal(st.network[k], v), k       # training goes on from the weights ...
            assert torch.equal(st.ema[k], load_safetensors(ema.saved[-1])[0][k]), k  # ... and the average
    assert "ss_ema_decay" not in read_header(raw.output).metadata   # not a key sd-scripts writes


def test_samples_render_with_the_average(tmp_path, vae):
    tiny = build_sd1(seed=4)
    model = trainable(tiny, vae)
    seen = []
    layer = next(m for n, m in tiny.unet.named_modules() if n.endswith("attn1.to_q"))

    def render(prompts, seed):
        with torch.no_grad():
            x = torch.ones(1, layer.in_features)
            seen.append(layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias))  # the LoRA's part
        return []
    model.render = render
    cfg = _config(tmp_path, "s", ema_decay=0.8, sample_every_n_steps=3, sample_prompts=["zkx"], save_every_n_steps=3)
    res = Trainer(model, make_plan(cfg), QUIET).run()
    assert len(seen) == 2
    key = next(t.key for t in ModelMap.build("sd1", tiny.unet, tiny.text_encoders).targets if t.module is layer)
    for out, path in zip(seen, res.saved):
        sd = load_safetensors(path)[0]
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        want = torch.ones(1, layer.in_features) @ down.T @ up.T * (4 / 4)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(seen[0], seen[1])
