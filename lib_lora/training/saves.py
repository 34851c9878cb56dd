"""A training run's saves: what a save at a step writes, pruning old ones, and resuming from one.

A save is the LoRA in kohya's form with its metadata and ``sshs_*`` hashes (the moving average of its
weights when the run keeps one, ema.py), and, when the run saves states or a stop asked for one, the
training state beside it (state.py).  Only the newest
``save_last_k`` intermediate saves are kept.  Resuming loads a state back into the network,
optimiser and schedule of a run over the same dataset.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..fileio import save_safetensors
from ..hashes import hashes_from_bytes
from . import flat_params, outputs
from .ema import LoraEMA
from .epochs import Position
from .half_weights import load_scaler_state, scaler_state
from .metadata import build_metadata
from .model import TrainableModel
from .network import TrainingNetwork
from .pivotal import PivotalWord
from .plan import Plan
from .state import TrainingState, config_record, load_state, save_state, state_path

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float": torch.float32}


def save_contents(model: TrainableModel, plan: Plan, net: TrainingNetwork, session_id: str, step: int, epoch: int,
                  started: float, opt: torch.optim.Optimizer, ema: LoraEMA | None = None,
                  pivot: PivotalWord | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (``ema``'s average when given; ``pivot``'s vectors bundled) and metadata a save at ``step``
    writes (with its ``sshs_*`` hashes)."""
    cfg, m = plan.config, model
    with ema.applied() if ema is not None else nullcontext():
        tensors = net.kohya_state_dict(SAVE_DTYPES[cfg.save_precision])
    if pivot is not None:
        tensors.update(pivot.bundle(SAVE_DTYPES[cfg.save_precision]))
    per_epoch = max(1, plan.dataset.steps_per_epoch(plan.global_batch))
    meta = build_metadata(
        family=m.family, prediction=m.prediction, session_id=session_id, started_at=started,
        output_name=cfg.output_name, cfg=cfg, dataset=plan.dataset, model_name=m.model_name,
        model_hash=m.model_hash, legacy_hash=m.legacy_hash, steps=step, epoch=epoch,
        num_batches_per_epoch=per_epoch, max_steps=plan.total_steps,
        optimizer_desc=type(opt).__module__ + "." + type(opt).__name__,
        resolution=cfg.dataset.reso, comment=cfg.training_comment, world_size=plan.world)
    # kohya hashes the file as written with only the ss_* keys in its header
    from safetensors.torch import save as st_save
    h = hashes_from_bytes(st_save({k: v.contiguous() for k, v in tensors.items()},
                                  {k: v for k, v in meta.items() if k.startswith("ss_")}))
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = h["sshs_model_hash"], h["sshs_legacy_hash"]
    return tensors, meta


def write_save(model: TrainableModel, plan: Plan, net: TrainingNetwork, path: Path, epoch: int, step: int,
               pos: Position, losses: list[float], started: float, opt: torch.optim.Optimizer, sched,
               session_id: str, state_asked: bool, log: Callable[[str], None], ema: LoraEMA | None = None,
               scaler: Any = None, pivot: PivotalWord | None = None) -> Path:
    """Write a save at ``step`` to ``path``, and its training state beside it when the run saves states
    or ``state_asked`` (a stop that asked for one); returns the LoRA file written."""
    cfg = plan.config
    tensors, meta = save_contents(model, plan, net, session_id, step, epoch, started, opt, ema, pivot)
    # make_plan() checked every name; a file that appeared since is replaced only if it is ours
    out = save_safetensors(tensors, path, meta, overwrite=outputs.may_replace(path, cfg.overwrite, session_id))
    spath = state_path(path)
    forced = state_asked and not cfg.save_state
    if forced and not outputs.may_replace(spath, cfg.overwrite, session_id):
        # not among the names make_plan checked: a file of that name that is not this run's stays
        log(f"not saving the training state: {spath} already exists")
        forced = False
    if cfg.save_state or forced:
        save_state(spath, TrainingState(
            step=step, position=pos, losses=losses, started=started, session=session_id,
            fingerprint=plan.dataset.fingerprint(), config=config_record(cfg),
            network=net.kohya_state_dict(torch.float32), optimizer=flat_params.state_dict(opt),
            scheduler=sched.state_dict(), ema=None if ema is None else ema.state_dict(net),
            scaler=None if scaler is None else scaler_state(scaler),
            pivotal=None if pivot is None else pivot.state_dict()),
            overwrite=outputs.may_replace(spath, cfg.overwrite, session_id))
        log(f"saved {spath}")
    log(f"saved {out}")
    return out


def prune_saves(saved: list[Path], keep: int) -> None:
    """Delete the oldest of ``saved`` (and their state files) until ``keep`` remain; 0 keeps all."""
    if keep <= 0:
        return
    while len(saved) > keep:
        old = saved.pop(0)
        for p in (old, state_path(old)):
            if p.exists():
                p.unlink()


def resume_state(path: Path, plan: Plan, net: TrainingNetwork, opt: torch.optim.Optimizer, sched,
                 ema: LoraEMA | None = None, log: Callable[[str], None] = print, scaler: Any = None,
                 pivot: PivotalWord | None = None) -> TrainingState:
    """Load the training state at ``path`` into ``net``, ``opt``, ``sched``, ``ema``, ``scaler`` and ``pivot`` and
    return it; refused when the dataset changed since it was saved, or when it trained another pivotal word."""
    st = load_state(Path(path))
    if st.fingerprint != plan.dataset.fingerprint():
        raise ValueError("the dataset changed since this state was saved; resuming would not continue the same run")
    if (st.pivotal or {}).get("word") != (pivot.word if pivot is not None else None):
        raise ValueError(f"the state was saved with pivotal_word {(st.pivotal or {}).get('word') or 'off'}, and "
                         f"this run has {pivot.word if pivot is not None else 'off'}: resuming would not continue it")
    net.load_kohya_state_dict(st.network)
    if pivot is not None:
        pivot.load_state_dict(st.pivotal)
    # the kernel is this torch's and this device's choice, not the saved run's
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    flat_params.load_state_dict(opt, st.optimizer)
    for g, k in zip(opt.param_groups, kernels):
        g.update(k)
    sched.load_state_dict(st.scheduler)
    if scaler is not None:
        load_scaler_state(scaler, st.scaler)
    if ema is not None:
        if st.ema is not None:
            ema.load_state_dict(net, st.ema)
        else:
            ema.restart()
            log("the resumed state kept no moving average of the weights: it starts from them now")
    return st
