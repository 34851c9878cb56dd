"""kohya's ``full_fp16`` / ``full_bf16``: the LoRA's own weights, gradients and optimiser state in half precision.

By default the LoRA is trained in fp32 (autocast computes in half where mixed precision asks,
but the weights the optimiser updates, and its moments, stay fp32).  sd-scripts' ``--full_fp16``
and ``--full_bf16`` cast the network itself to the mixed-precision type, with no fp32 master
copy: half the memory for the LoRA and its optimiser state, at the cost of precision.  bf16 keeps
fp32's range but only 8 significant bits, so an update smaller than about 1/256 of a weight is
lost to rounding; fp16 keeps 11 bits but its range ends at 65504 and its smallest normal is
6e-5, so small gradients and their squares (Adam's second moment) round to zero.

The update then goes through ``HalfStep``, which stands in for torch's ``GradScaler`` (whose
``unscale_`` refuses fp16 gradients): for fp16 a dynamic loss scale (start 2^16, halved on a
step with an overflow, doubled after 2000 good steps, as GradScaler's defaults); for both a
guard, so a non-finite weight never reaches the model: a step whose gradients are not all
finite is skipped, and a step that leaves a weight or the optimiser's state non-finite anyway
is undone, the weights and the optimiser state put back as they were before it.  Skipped steps
still count as steps (the schedule moves on, as with GradScaler), and each one is logged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import flat_params

GROWTH_INTERVAL = 2000   # good steps before an fp16 loss scale doubles (GradScaler's default)
INIT_SCALE = 2.0 ** 16
# AdamW's eps with fp16 state: (1 - beta2) g^2 rounds to 0 in fp16 for |g| below about 5.5e-3, so the
# step is lr * m / eps there; torch's 1e-8 (itself 0 in fp16) then makes it explode (README: measured)
FP16_ADAMW_EPS = 1e-4


def weight_dtype(full_fp16: bool, full_bf16: bool) -> torch.dtype | None:
    """The LoRA's own dtype for kohya's switches (None: fp32, the default)."""
    return torch.float16 if full_fp16 else torch.bfloat16 if full_bf16 else None


def adamw_eps(optimizer: str, full_fp16: bool, optimizer_args: dict) -> float | None:
    """AdamW's eps where this trainer chooses it: ``FP16_ADAMW_EPS`` for fp16 weights unless the user gave one."""
    if full_fp16 and optimizer.lower() == "adamw" and "eps" not in optimizer_args:
        return FP16_ADAMW_EPS
    return None


def hold_in_half(net: torch.nn.Module, cfg: Any, log: Callable[[str], None]) -> None:
    """The LoRA's weights cast to the type kohya's ``full_fp16``/``full_bf16`` ask for (nothing without them),
    before the optimiser sees them; the log says so."""
    dtype = weight_dtype(cfg.full_fp16, cfg.full_bf16)
    if dtype is None:
        return
    net.to(dtype)
    log(f"the LoRA's weights, gradients and optimiser state are {str(dtype).removeprefix('torch.')}")
    if adamw_eps(cfg.optimizer, cfg.full_fp16, cfg.optimizer_args) is not None:
        log(f"full_fp16: AdamW's eps is {FP16_ADAMW_EPS:g}, not 1e-08: fp16 holds Adam's second moment as 0 for "
            "gradients below about 5.5e-3, and eps alone would then divide the step (optimizer_args eps= sets another)")


def _finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one sync for all of them


class HalfStep:
    """``GradScaler``'s four calls for LoRA weights held in ``dtype`` (fp16: loss scaling; both: the guard)."""

    def __init__(self, dtype: torch.dtype, log: Callable[[str], None] = print):
        self.dynamic = dtype == torch.float16
        self.loss_scale = INIT_SCALE if self.dynamic else 1.0
        self.log = log
        self.skipped = 0            # steps skipped so far
        self._good = 0
        self._grads_finite: bool | None = None   # set by unscale_, cleared by update
        self._skipped_now = False

    def scale(self, loss: Tensor) -> Tensor:
        return loss * self.loss_scale if self.loss_scale != 1 else loss

    def unscale_(self, opt: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (once per step) and note whether they are all finite."""
        if self._grads_finite is not None:
            return
        grads = [p.grad for p in flat_params.params(opt) if p.grad is not None]
        if self.loss_scale != 1 and grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scale)
        self._grads_finite = _finite(grads)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """``opt.step()``, unless the gradients are not finite; undone if it leaves a weight or state non-finite."""
        self.unscale_(opt)
        if not self._grads_finite:
            self._skip("a gradient is not finite" + (f" at loss scale {self.loss_scale:g}" if self.dynamic else ""))
            return
        params = flat_params.params(opt)
        before = _snapshot(opt)
        opt.step()
        # the state too: an fp16 moment that overflowed to inf leaves its weight finite (m / inf = 0) but frozen
        state = [v for p in params for k, v in opt.state.get(p, {}).items() if isinstance(v, Tensor) and k != "step"]
        if not _finite(params + state):
            _restore(opt, before)
            self._skip("the update left a weight or the optimiser's state non-finite; both put back")

    def update(self) -> None:
        """After ``step``: the fp16 loss scale halved after a skip, doubled after ``GROWTH_INTERVAL`` good steps."""
        if self._skipped_now:
            self._good = 0
            if self.dynamic:
                self.loss_scale = max(self.loss_scale / 2, 1.0)
        else:
            self._good += 1
            if self.dynamic and self._good >= GROWTH_INTERVAL:
                self.loss_scale *= 2
                self._good = 0
        self._grads_finite, self._skipped_now = None, False

    def state_dict(self) -> dict[str, Any]:
        """The loss scale and its count of good steps, for the resume state (an exact resume needs them)."""
        return {"loss_scale": self.loss_scale, "good": self._good, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_scale, self._good = float(state["loss_scale"]), int(state["good"])
        self.skipped = int(state["skipped"])

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self._skipped_now = True
        self.log(f"half-precision weights: step skipped ({why}); {self.skipped} skipped so far")


def _snapshot(opt: torch.optim.Optimizer) -> list[tuple[Tensor, Tensor, dict[str, Any]]]:
    """Copies of every parameter and its optimiser state (the LoRA is small: one flat tensor and a few)."""
    out = []
    for p in flat_params.params(opt):
        st = {k: v.clone() if isinstance(v, Tensor) else v for k, v in opt.state.get(p, {}).items()}
        out.append((p, p.detach().clone(), st))
    return out


@torch.no_grad()
def _restore(opt: torch.optim.Optimizer, saved: list[tuple[Tensor, Tensor, dict[str, Any]]]) -> None:
    for p, value, st in saved:
        p.copy_(value)       # in place: a flat Parameter's members stay views of it
        if st:
            for k, v in st.items():
                cur = opt.state[p].get(k)
                if isinstance(v, Tensor) and isinstance(cur, Tensor) and cur.shape == v.shape:
                    cur.copy_(v)
                else:
                    opt.state[p][k] = v
        else:
            opt.state.pop(p, None)   # the first step created the state: drop it again


def step_another(scaler: Any, opt: torch.optim.Optimizer, what: str) -> None:
    """Step a second optimiser (fp32 parameters, e.g. the pivotal word's vectors) through the run's scaler, before
    its ``update``: an enabled ``GradScaler`` unscales, skips on a non-finite gradient and lowers its scale for it
    as for the LoRA's; otherwise the gradients are divided by ``HalfStep``'s loss scale (or 1), and a non-finite
    one skips the step, which ``HalfStep`` counts as a skipped step (its scale halves) and logs."""
    grads = [p.grad for p in flat_params.params(opt) if p.grad is not None]
    if not grads:   # GradScaler refuses an optimiser with no gradient at all
        return
    if not isinstance(scaler, HalfStep) and scaler.is_enabled():
        scaler.step(opt)
        return
    scale = scaler.loss_scale if isinstance(scaler, HalfStep) else 1.0
    if scale != 1:
        torch._foreach_mul_(grads, 1.0 / scale)
    if _finite(grads):
        opt.step()
    elif isinstance(scaler, HalfStep):
        scaler._skip(f"a gradient of {what} is not finite" + (f" at loss scale {scale:g}" if scaler.dynamic else ""))
    else:
        raise FloatingPointError(f"a gradient of {what} is not finite; lower its learning rate")


def scaler_state(scaler: Any) -> dict[str, Any] | None:
    """What a resume needs of ``scaler`` (``HalfStep`` or an enabled ``GradScaler``), named by its kind (None: nothing
    to keep)."""
    if isinstance(scaler, HalfStep) or scaler.is_enabled():
        return {"kind": type(scaler).__name__, "state": scaler.state_dict()}
    return None


def load_scaler_state(scaler: Any, saved: dict[str, Any] | None) -> None:
    """``scaler_state``'s record back into a scaler of the same kind (a state of earlier releases has none)."""
    if saved and saved.get("kind") == type(scaler).__name__ and (isinstance(scaler, HalfStep) or scaler.is_enabled()):
        scaler.load_state_dict(saved["state"])


def make_scaler(half: torch.dtype | None, use_cuda: bool, mixed_precision: str, log: Callable[[str], None]) -> Any:
    """What the loop scales, unscales and steps through: ``HalfStep`` for half-precision weights, else torch's
    ``GradScaler`` (on only for fp16 autocast on CUDA)."""
    if half is not None:
        return HalfStep(half, log)
    enabled = use_cuda and mixed_precision == "fp16"
    if hasattr(torch.amp, "GradScaler"):       # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)   # the torch 2.1 that WebUI 1.10 installs
