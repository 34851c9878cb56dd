"""The update a training step makes: the optimiser (with this torch's fastest AdamW kernel), the
learning-rate schedule, and the per-timestep loss weights (min-SNR, debiased estimation)."""
from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
from torch import Tensor

from .config import TrainConfig
from .flat_params import flatten
from .half_weights import adamw_eps
from .options import check_optimizer

# parameter groups that AdamW updates as one flat tensor (flat_params.py): the UNet's LoRA, every
# layer of which gets a gradient in every step; a text encoder's may not (its last layers, when the
# UNet reads a hidden state before them), and a zero gradient would still decay those weights
FLAT_GROUPS = ("unet",)


def adamw_kernel(groups: list[dict]) -> dict:
    """``fused=True`` where this torch has a fused AdamW for the parameters' device (CUDA; CPU from
    torch 2.4): one kernel for every LoRA tensor instead of a dozen per tensor.  Elsewhere torch's
    own choice (foreach on CUDA)."""
    from torch.utils import _foreach_utils
    supported = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    devices = {p.device.type for g in groups for p in g["params"]}
    return {"fused": True} if len(devices) == 1 and devices <= set(supported) else {}


def make_optimizer(name: str, groups: list[dict], cfg: TrainConfig) -> tuple[torch.optim.Optimizer, str]:
    """The optimiser and kohya's ``ss_optimizer`` description. Extra packages are never installed for you."""
    args = dict(cfg.optimizer_args)
    entry = check_optimizer(name)
    if entry is None:
        eps = adamw_eps(name, cfg.full_fp16, args)  # fp16 weights: a larger default (half_weights.py)
        if eps is not None:
            args["eps"] = eps
        groups = [{**g, "params": [flatten(g["params"])]} if g.get("name") in FLAT_GROUPS and len(g["params"]) > 1
                  else g for g in groups]
        opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                **({} if {"fused", "foreach"} & set(args) else adamw_kernel(groups)), **args)
        return opt, "torch.optim.adamw.AdamW"
    _, module, cls = entry
    mod = importlib.import_module(module)
    opt = getattr(mod, cls)(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **args)
    return opt, f"{module}.{cls}"


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return f


def snr_weights(acp: Tensor, gamma: float, prediction: str) -> Tensor:
    """min-SNR-gamma loss weights (Hang et al. 2023), in kohya's form for epsilon and v targets."""
    snr = acp / (1 - acp)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v" else clipped / snr


def debiased_weights(acp: Tensor, prediction: str) -> Tensor:
    """Debiased-estimation loss weights (kohya's --debiased_estimation_loss): 1/sqrt(SNR) for epsilon
    targets, 1/(SNR+1) for v, with SNR capped at 1000 (timestep 0's SNR is near infinite)."""
    snr = torch.clamp(acp / (1 - acp), max=1000.0)
    return 1 / (snr + 1) if prediction == "v" else snr.rsqrt()
