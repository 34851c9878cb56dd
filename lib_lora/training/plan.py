"""A training run's plan: the validated config with its dataset scanned and every output name checked.

Made before any model exists (a job answers with the dataset's problems, or a file that would be
overwritten, before it waits for the host's lock), and handed to ``Trainer`` with the model.
Under ``accelerate launch`` each process makes the same plan; only the main one sweeps and logs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import outputs
from .checks import pivotal_caption_problem
from .config import TrainConfig
from .dataset import Dataset
from .problems import DatasetError
from .scan import scan
from .state import read_state_header


@dataclass(frozen=True)
class Plan:
    config: TrainConfig
    dataset: Dataset
    resume_from: Path | None
    summary: dict               # the dataset's summary for the global batch (Dataset.summary)
    total_steps: int
    dist: Any = None            # accelerate's PartialState when launched with several processes
    world: int = 1
    rank: int = 0

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def with_config(self, **changes: Any) -> "Plan":
        """The same plan with a copy of its config changed (e.g. mixed precision resolved for the model)."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))


def total_steps(cfg: TrainConfig, dataset: Dataset, global_batch: int) -> int:
    if cfg.max_train_epochs:
        per_epoch = math.ceil(dataset.steps_per_epoch(global_batch) / cfg.gradient_accumulation_steps)
        return per_epoch * cfg.max_train_epochs
    return cfg.max_train_steps


def make_plan(config: TrainConfig, resume_from: str | Path | None = None,
              log: Callable[[str], None] = print) -> Plan:
    """Scan and validate the dataset (raises DatasetError with the file named) and every output name.

    Any file the run would write that exists already is refused (FileExistsError) unless
    overwriting was asked for or, when resuming, the file belongs to the resumed run.
    """
    dist = distributed_state()
    world, rank = (dist.num_processes, dist.process_index) if dist else (1, 0)
    gb = config.batch_size * world
    dataset = scan(config.dataset, strict=True)
    problem = pivotal_caption_problem(config.pivotal_word, dataset.captions()) if config.pivotal_word else None
    if problem:
        raise DatasetError(problem, config.dataset.train_dir, kind="pivotal_word")
    resume = Path(resume_from) if resume_from is not None else None
    owner = read_state_header(resume).session if resume is not None else None
    total = total_steps(config, dataset, gb)
    paths = outputs.planned(config, total, max(1, dataset.steps_per_epoch(gb)))
    outputs.check_free(paths, config.overwrite, owner)
    if rank == 0:
        for problem in dataset.problems:  # the dataset's warnings (stray images, upscaling...), never silent
            if problem.severity == "warning":
                log(f"warning: {problem.message}")
        for p in outputs.sweep_temp(paths):
            log(f"removed {p.name}, left by an interrupted save")
    return Plan(config, dataset, resume, dataset.summary(gb), total, dist, world, rank)


def distributed_state():
    """accelerate's process state when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState
    # without CUDA, accelerate only picks gloo on CPU when told so
    return PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true")
