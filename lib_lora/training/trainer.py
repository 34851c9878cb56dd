"""The LoRA training loop: kohya's recipe on whatever model a host hands over.

One *step* is one optimiser update (``gradient_accumulation_steps`` batches).  All
randomness is derived from (seed, step, ...) rather than carried state, so a run
resumed from a saved state continues exactly as the uninterrupted run would have.
Whatever happens (finished, stopped, or an exception mid-step), ``run`` leaves the
host's modules as it found them: hooks removed, requires_grad and train/eval flags
restored, weights never written (mode.py).  Between two steps ``Callbacks.between_steps``
may hand the model back as loaded for a while (``StepBoundary``): nothing of the run lives
in the model, so it continues exactly as it would have.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from ..bundled import BundledEmbedding, parse_bundle, split_bundle
from ..fileio import load_safetensors
from .checks import model_notes, timestep_range
from .frozen_layers import lean_by_default
from .half_weights import hold_in_half, make_scaler, weight_dtype
from .dataset import Dataset
from .ema import LoraEMA
from .epochs import Batch, Position, derive_seed
from .latents import LatentCache, TextCache, fill_caches
from .mode import TrainingMode
from .model import TrainableModel
from .network import TrainingNetwork
from .pivotal import PivotalWord
from . import flat_params, outputs, sample_prompts, tensorboard
from .optim import debiased_weights, lr_lambda, make_optimizer, snr_weights
from .plan import Plan
from .saves import prune_saves, resume_state, write_save
from .callbacks import Callbacks, Progress, StepBoundary, TrainResult

__all__ = ["Trainer", "Callbacks", "Progress", "StepBoundary", "TrainResult"]


class Trainer:
    """The loop over one ready model and one plan (plan.py); the caller's config is never written."""

    def __init__(self, model: TrainableModel, plan: Plan, callbacks: Callbacks | None = None):
        self.cb = callbacks or Callbacks()
        for line in model_notes(model.family, model.prediction, plan.config.v2, plan.config.v_parameterization):
            self.cb.log(line)
        # [lo, hi) of the training timesteps: a max_timestep beyond the model's schedule is capped, and said so
        lo, hi, note = timestep_range(plan.config.min_timestep, plan.config.max_timestep, len(model.alphas_cumprod))
        self._t_range = lo, hi
        if note:
            self.cb.log(note)
        if plan.config.v_parameterization is not None:  # the user's word on what the model predicts
            model = dataclasses.replace(model, prediction="v" if plan.config.v_parameterization else "epsilon")
        self.model, self.plan, self.cfg = model, plan, plan.config
        self.dataset: Dataset = plan.dataset
        self._stop: str | None = None
        self.paused_seconds = 0.0  # spent suspended at step boundaries (StepBoundary.suspended)
        self._state_on_stop = False  # the final save of a stopped run also writes its training state
        self.session_id = str(random.SystemRandom().randint(0, 2**32))  # an integer, as kohya's ss_session_id
        self._ema: LoraEMA | None = None  # the LoRA's moving average while a run keeps one (ema_decay)
        self._scaler: Any = None          # the run's loss scaler (half_weights.make_scaler), kept in resume states
        self._pivot: PivotalWord | None = None  # the pivotal word's vectors while a run trains them (pivotal_word)
        # Under `accelerate launch`, each process trains its slice of every global batch and the
        # gradients are summed through accelerate; one process alone is the same code with world 1.
        self.dist, self.world, self.rank = plan.dist, plan.world, plan.rank

    @property
    def global_batch(self) -> int:
        return self.plan.global_batch

    @property
    def is_main(self) -> bool:
        return self.plan.is_main

    # -- control ---------------------------------------------------------------------
    def request_stop(self, save: bool = False, state: bool = False) -> None:
        """Stop after the current step; with ``save`` the network is written first, with ``state`` also
        the training state beside it (even without ``save_state``), so the run can be resumed."""
        self._stop = "save" if save or state else "stop"
        self._state_on_stop = self._state_on_stop or state

    def _stopping(self) -> bool:
        """Whether to stop before the next step; under accelerate every process stops at the same step
        and the same way (one asked is enough), or the next gradient sum would wait forever."""
        if self.dist:
            from accelerate.utils import gather
            mine = {None: 0, "stop": 1, "save": 2}[self._stop] + 4 * self._state_on_stop
            codes = [int(c) for c in gather(torch.tensor([mine], device=self.model.device)).tolist()]
            kind = max(c % 4 for c in codes)
            if kind:
                self._stop = "save" if kind == 2 else "stop"
                self._state_on_stop = any(c >= 4 for c in codes)
        return bool(self._stop)

    def release(self) -> None:
        """Drop the model (a finished job is kept for its status and must not keep it alive)."""
        self.model, self._ema, self._pivot = None, None, None

    def output_path(self, step: int | None = None, epoch: int | None = None) -> Path:
        return outputs.output_path(self.cfg.output_dir, self.cfg.output_name, step, epoch)

    def total_steps(self) -> int:
        return self.plan.total_steps

    # -- the run -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train (resuming from ``plan.resume_from`` when set) and save; the model is left as found."""
        cfg, m = self.cfg, self.model
        if _dtype(m.unet) in (torch.float16, torch.bfloat16) and not (
                m.device.type == "cuda" and cfg.mixed_precision != "no"):
            # a half model computes only under autocast (the host's own generation runs so too);
            # full precision would need a second, fp32 copy of the model
            raise ValueError(f"the model's weights are {str(_dtype(m.unet)).removeprefix('torch.')}: train it with "
                             "mixed precision fp16 or bf16 on a CUDA device (on CPU, load the model in fp32, e.g. "
                             "the WebUI's --no-half)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # LoRA init without disturbing the host's global RNG
            net = TrainingNetwork(m.model_map, cfg.network)
        start = self._start_from(net) if cfg.network_weights else None
        self._pivot = PivotalWord(m, cfg.pivotal_word, cfg.pivotal_lr, cfg.pivotal_steps, start) \
            if cfg.pivotal_word else None
        hold_in_half(net, cfg, self.cb.log)  # kohya's full_fp16/full_bf16
        latents, texts = LatentCache(m, self.dataset, cfg, write_disk=self.is_main), TextCache(m, cfg)
        mode = TrainingMode(m, net, self._lean(), cfg.gradient_checkpointing,
                            [self._pivot.placed] if self._pivot else [])
        callbacks, tb = self.cb, None
        if self.is_main and tensorboard.wanted(cfg):
            per_epoch = max(1, self.dataset.steps_per_epoch(self.global_batch))
            tb = tensorboard.TensorBoardLog(cfg, outputs.updates_per_epoch(per_epoch, cfg.gradient_accumulation_steps))
            self.cb = tb.wrap(callbacks)
            self.cb.log(f"TensorBoard: logging to {tb.folder}")
        try:
            mode.enter()
            return self._loop(net, self.plan.resume_from, latents, texts, mode)
        finally:
            mode.leave()
            latents.clear()
            texts.clear()
            self.cb = callbacks
            if tb is not None:
                tb.close()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _start_from(self, net: TrainingNetwork) -> BundledEmbedding | None:
        """Load ``network_weights`` into ``net``; the pivotal word's embedding bundled in it, if any."""
        cfg, name = self.cfg, Path(self.cfg.network_weights).name
        lora, bundle = split_bundle(load_safetensors(cfg.network_weights)[0])
        fresh = net.load_weights(lora, name)
        self.cb.log(f"starting from {name}" + (f"; {len(fresh)} layers it lacks start fresh" if fresh else ""))
        embeddings = parse_bundle(name, bundle)
        others = sorted(set(embeddings) - {cfg.pivotal_word})
        if others:
            self.cb.log(f"{name}: its bundled embedding(s) {', '.join(others)} are not trained or saved by this run"
                        + ("" if cfg.pivotal_word else " (pivotal_word trains one of them on)"))
        return embeddings.get(cfg.pivotal_word) if cfg.pivotal_word else None

    def _lean(self) -> bool:
        lean = self.cfg.lean_frozen_layers
        return lean_by_default(self.model.device, self.model.unet) if lean is None else lean

    def _loop(self, net: TrainingNetwork, resume_from, latents: LatentCache, texts: TextCache,
              mode: TrainingMode) -> TrainResult:
        cfg, m, ds = self.cfg, self.model, self.dataset
        groups = net.param_groups(cfg.unet_learning_rate, cfg.text_encoder_learning_rate)
        opt, opt_desc = make_optimizer(cfg.optimizer, groups, cfg)
        total = self.total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler, cfg.lr_warmup_steps, total))
        step, pos, losses, started = 0, Position(), [], time.time()
        self._ema = LoraEMA(flat_params.params(opt), cfg.ema_decay) if cfg.ema_decay else None
        use_cuda = m.device.type == "cuda"
        scaler = self._scaler = make_scaler(weight_dtype(cfg.full_fp16, cfg.full_bf16), use_cuda, cfg.mixed_precision,
                                            self.cb.log)
        if resume_from is not None:
            step, pos, losses, started = self._resume(resume_from, net, opt, sched)
        amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        autocast = torch.autocast("cuda", dtype=amp_dtype) if (use_cuda and amp_dtype) else nullcontext()
        text_trains, pivot = cfg.network.train_text_encoder, self._pivot
        batches = ds.iterate(self.global_batch, cfg.seed, pos)
        per_epoch = max(1, ds.steps_per_epoch(self.global_batch))
        fill_caches(ds, latents, texts, not text_trains and pivot is None, self.cb.on_caching, self.cb.log,
                    lambda: self._stop is not None)
        saved: list[Path] = []
        t0, step0 = time.time(), step
        acp_all = m.alphas_cumprod.to(m.device, torch.float32)
        t_lo, t_hi = self._t_range
        batch: Batch | None = None
        B = cfg.batch_size
        if step == 0 and self.is_main and sample_prompts.due(cfg, 0, per_epoch)[0]:
            self._samples(net, 0)  # kohya's sample_at_first
        while step < total:
            if self._stopping():
                break
            loss_val = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                n = len(batch.items)
                lo, hi = min(self.rank * B, n), min(self.rank * B + B, n)
                if lo == hi:
                    continue  # a short last batch of the epoch left this process nothing
                samples = [ds.sample(batch, slot) for slot in range(lo, hi)]
                x0 = latents.encode(samples)
                cond = texts.encode([s.caption for s in samples], [s.size_cond for s in samples],
                                    frozen=not (text_trains or (pivot is not None and pivot.training)))
                # noise and timesteps are drawn for the whole global batch, then sliced: the same
                # numbers whatever the number of processes
                g = torch.Generator(m.device).manual_seed(derive_seed(cfg.seed, "noise", step, micro))
                shape = (n, *x0.shape[1:])
                noise = torch.randn(shape, generator=g, device=m.device)
                if cfg.noise_offset:
                    noise += cfg.noise_offset * torch.randn((*shape[:2], 1, 1), generator=g, device=m.device)
                t = torch.randint(t_lo, t_hi, (n,), generator=g, device=m.device)
                noise, t = noise[lo:hi], t[lo:hi]
                acp = acp_all[t].view(-1, 1, 1, 1)
                noisy = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
                with _global_rng_seeded(m.device, derive_seed(cfg.seed, "dropout", step, micro, self.rank)):
                    with autocast:
                        pred = m.predict(noisy.to(_dtype(m.unet)), t, cond)
                target = noise if m.prediction == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * x0
                loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
                if cfg.prior_loss_weight != 1.0:  # kohya's weight on the regularisation images' loss
                    loss = loss * torch.tensor([cfg.prior_loss_weight if s.item.is_reg else 1.0
                                                for s in samples], device=loss.device)
                if cfg.min_snr_gamma:
                    loss = loss * snr_weights(acp.flatten(), cfg.min_snr_gamma, m.prediction)
                if cfg.debiased_estimation_loss:
                    loss = loss * debiased_weights(acp.flatten(), m.prediction)
                loss = loss.sum() / (n * cfg.gradient_accumulation_steps)  # this slice's share of the mean
                scaler.scale(loss).backward()
                loss_val += loss.item()
            if self.dist:
                loss_val = self._all_reduce_grads(opt, loss_val, pivot)
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss became {loss_val} at step {step + 1}; lower the learning rate")
            if cfg.max_grad_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(flat_params.params(opt), cfg.max_grad_norm)
            scaler.step(opt)
            if pivot is not None:
                pivot.step(step + 1, scaler)
            scaler.update()
            flat_params.zero_grads(opt)
            sched.step()
            step += 1
            if self._ema is not None:
                self._ema.update(step)
            losses.append(loss_val)
            pos = batch.next_position
            elapsed = time.time() - t0 - self.paused_seconds  # training time: a pause is not a slow step
            rate = elapsed / max(step - step0, 1)
            if self.cb.on_progress:
                recent = losses[-50:]
                self.cb.on_progress(Progress(step, total, pos.epoch, loss_val, sum(recent) / len(recent),
                                             sched.get_last_lr()[0], elapsed, rate * (total - step),
                                             {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}))
            for path, epoch in (outputs.saves_due(cfg, step, per_epoch) if step < total else []):
                saved.append(self._save(net, path, epoch, step, pos, losses, started, opt, sched))
                if self.is_main:
                    prune_saves(saved, cfg.save_last_k)
            if self.is_main and sample_prompts.due(cfg, step, per_epoch)[0]:
                self._samples(net, step)
            if self.cb.between_steps is not None and step < total and not self._stop:
                self.cb.between_steps(StepBoundary(self, mode, net, step, pos, losses, started, opt, sched))
        stopped = step < total
        out = None
        if stopped and step == step0:
            self.cb.log("stopped before the first step: nothing to save")
        elif not stopped or self._stop == "save":
            epochs = outputs.final_epoch(step, per_epoch, cfg.gradient_accumulation_steps)
            out = self._save(net, self.output_path(), epochs, step, pos, losses, started, opt, sched)
            saved.append(out)
        return TrainResult(out, step, losses, stopped, saved)

    def _all_reduce_grads(self, opt: torch.optim.Optimizer, loss_val: float, pivot: PivotalWord | None) -> float:
        """Sum every process's gradient share (and loss) through accelerate."""
        from accelerate.utils import reduce

        extra = list(pivot.vectors.values()) if pivot is not None and pivot.training else []
        dev = self.model.device
        # a batch without the pivotal word leaves its vectors no gradient, and one process alone does not step
        # them then: nor may several, whose zero-filled sum would still move AdamW's moments
        word_seen = bool(extra) and float(reduce(torch.tensor([float(any(p.grad is not None for p in extra))],
                                                              device=dev), reduction="sum").item()) > 0
        for p in flat_params.params(opt) + (extra if word_seen else []):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(reduce(p.grad, reduction="sum"))   # in place: a flat gradient's views stay its own
        return float(reduce(torch.tensor([loss_val], device=dev), reduction="sum").item())

    # -- saving (saves.py) -------------------------------------------------------------
    def _save(self, net, path, epoch, step, pos, losses, started, opt, sched) -> Path:
        if self.is_main:
            asked = self._stop is not None and self._state_on_stop and path == self.output_path()
            out = write_save(self.model, self.plan, net, path, epoch, step, pos, losses, started, opt, sched,
                             self.session_id, asked, self.cb.log, self._ema, self._scaler, self._pivot)
            if self.cb.on_saved:
                self.cb.on_saved(out)
        if self.dist:
            self.dist.wait_for_everyone()
        return path

    def _step_epoch(self, step: int) -> int:
        """ss_epoch of a save at optimiser step ``step`` (kohya's: the epoch it falls in, from 0)."""
        per_epoch = max(1, self.dataset.steps_per_epoch(self.global_batch))
        return (step - 1) // outputs.updates_per_epoch(per_epoch, self.cfg.gradient_accumulation_steps)

    def _resume(self, path, net, opt, sched):
        st = resume_state(path, self.plan, net, opt, sched, self._ema, self.cb.log, self._scaler, self._pivot)
        self.session_id = st.session
        self.cb.log(f"resumed at step {st.step} from {path}")
        return st.step, st.position, list(st.losses), st.started

    def _samples(self, net, step: int) -> None:
        if self.model.render is None:
            return
        net.eval()
        try:  # with the weights a save writes: the average when the run keeps one
            with torch.no_grad(), self._ema.applied() if self._ema is not None else nullcontext():
                images = self.model.render(self.cfg.sample_prompts, seed=self.cfg.seed)
        finally:
            net.train()
        if self.cb.on_samples:
            self.cb.on_samples(step, images)



@contextmanager
def _global_rng_seeded(device: torch.device, seed: int) -> Iterator[None]:
    """torch's global generators of the CPU and ``device`` seeded for a block, then put back as they were.

    What ``fork_rng`` + ``manual_seed`` did, without ``manual_seed`` seeding every device kind torch
    knows of, which costs far more than seeding the two generators a step uses.
    """
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[torch.cuda.current_device() if device.index is None else device.index] \
                .manual_seed(seed)
        yield


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
