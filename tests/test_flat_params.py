"""flat_params: AdamW over one flat buffer updates every LoRA tensor exactly as torch's AdamW over the
tensors themselves, and its saved state is the per-tensor state."""
from __future__ import annotations

import copy
import types

import pytest
import torch

from lib_lora.modelmap import ModelMap
from lib_lora.training import flat_params
from lib_lora.training.mode import TrainingMode
from lib_lora.training.network import NetworkConfig, TrainingNetwork
from tiny_models import build_sd1


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((4, 6), (6, 4), (3, 5, 1, 1), (7,))]


def _step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, i: int, zero) -> None:
    x = torch.randn(6, generator=torch.Generator().manual_seed(100 + i))
    a, b, c, d = params
    loss = (a @ x).square().sum() + (b @ a @ x).sin().sum() + c.flatten().cos().sum() * d.sum()
    loss.backward()
    opt.step()
    zero()


def _runs(steps: int, **kw):
    """The same steps by torch's AdamW on the tensors and on their flat buffer."""
    ref, mine = _params(), _params()
    ref_opt = torch.optim.AdamW(ref, lr=0.05, weight_decay=0.1, **kw)
    flat = flat_params.flatten(mine)
    opt = torch.optim.AdamW([flat], lr=0.05, weight_decay=0.1, **kw)
    for i in range(steps):
        _step(ref, ref_opt, i, lambda: ref_opt.zero_grad(set_to_none=True))
        _step(mine, opt, i, lambda: flat_params.zero_grads(opt))
    return ref, ref_opt, mine, opt


def test_adamw_on_the_flat_buffer_is_adamw_on_each_tensor():
    ref, _, mine, _ = _runs(5)
    for a, b in zip(ref, mine):
        assert torch.equal(a, b)
    ref, _, mine, _ = _runs(3, foreach=True)
    for a, b in zip(ref, mine):
        assert torch.equal(a, b)


def test_the_gradients_accumulate_into_the_flat_buffer():
    params = _params()
    flat = flat_params.flatten(params)
    sum(p.sum() for p in params).backward()
    sum((2 * p).sum() for p in params).backward()
    assert torch.equal(flat.grad, torch.full_like(flat, 3.0))
    flat_params.zero_grads(torch.optim.AdamW([flat]))
    assert not flat.grad.any() and all(p.grad.data_ptr() >= flat.grad.data_ptr() for p in params)


def test_the_saved_state_is_per_tensor_and_resumes_exactly():
    ref, ref_opt, mine, opt = _runs(3)
    # (a loaded state_dict's tensors are the optimiser's own: a copy keeps this one as saved)
    saved, expected = flat_params.state_dict(opt), copy.deepcopy(ref_opt.state_dict())
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for i, st in expected["state"].items():
        for k, v in st.items():
            assert torch.equal(saved["state"][i][k], v), k
    # a fresh run loads either file (ours, or one written per tensor, as older releases did) and
    # continues as the uninterrupted one
    for state in (saved, expected):
        again = [torch.nn.Parameter(p.detach().clone()) for p in mine]
        again_opt = torch.optim.AdamW([flat_params.flatten(again)], lr=0.05, weight_decay=0.1)
        flat_params.load_state_dict(again_opt, copy.deepcopy(state))
        for i in range(3, 5):
            _step(again, again_opt, i, lambda: flat_params.zero_grads(again_opt))
        ref_cont = [torch.nn.Parameter(p.detach().clone()) for p in ref]
        cont_opt = torch.optim.AdamW(ref_cont, lr=0.05, weight_decay=0.1)
        cont_opt.load_state_dict(copy.deepcopy(expected))
        for i in range(3, 5):
            _step(ref_cont, cont_opt, i, lambda: cont_opt.zero_grad(set_to_none=True))
        for a, b in zip(ref_cont, again):
            assert torch.equal(a, b)


def test_reentering_training_mode_keeps_the_loras_in_the_flat_buffer():
    """``suspended`` leaves and re-enters training mode between two steps: the LoRA tensors stay views of
    the buffer the optimiser updates, and a layer moved meanwhile is refused, not silently detached."""
    tiny = build_sd1()
    net = TrainingNetwork(ModelMap.build(tiny.family, tiny.unet, tiny.text_encoders), NetworkConfig(rank=2, alpha=2))
    model = types.SimpleNamespace(unet=tiny.unet, text_encoders=tiny.text_encoders, device=torch.device("cpu"),
                                  context=None)
    mode = TrainingMode(model, net, lean=False, checkpointing=False)
    mode.enter()
    flat = flat_params.flatten(list(net.parameters()))
    opt = torch.optim.SGD([flat], lr=1.0)
    with mode.suspended():
        pass
    before = [p.detach().clone() for p in net.parameters()]
    flat.grad.fill_(0.25)
    opt.step()
    assert all(torch.equal(p.detach(), b - 0.25) for p, b in zip(net.parameters(), before))

    with pytest.raises(RuntimeError, match="moved to meta while training was suspended"):
        with mode.suspended():
            tiny.unet.to("meta")
    mode.leave()
    assert all(p.device.type == "cpu" for p in net.parameters())
