"""``TrainConfig``: one training run's settings (the typed container; options.py declares them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import options
from .dataset import DatasetConfig
from .network import NetworkConfig

_d = options.default


@dataclass
class TrainConfig:
    """The run's settings; defaults, bounds and choices are declared in options.py."""
    dataset: DatasetConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)
    output_dir: str | Path = _d("output_dir")
    output_name: str = _d("output_name")
    network_weights: str | Path | None = _d("network_weights")  # start from this LoRA file (kohya's option)
    save_precision: str = _d("save_precision")
    save_model_as: str = _d("save_model_as")
    save_every_n_steps: int = _d("save_every_n_steps")
    save_every_n_epochs: int = _d("save_every_n_epochs")
    save_last_k: int = _d("save_last_k")            # keep only the newest K intermediate files (0: keep all)
    save_state: bool = _d("save_state")             # write resumable state beside each saved LoRA
    overwrite: bool = _d("overwrite")
    max_train_steps: int = _d("max_train_steps")
    max_train_epochs: int | None = _d("max_train_epochs")  # when set, overrides max_train_steps
    batch_size: int = _d("batch_size")
    gradient_accumulation_steps: int = _d("gradient_accumulation_steps")
    learning_rate: float = _d("learning_rate")      # both parts, unless unet_lr / text_encoder_lr is set
    unet_lr: float | None = _d("unet_lr")
    text_encoder_lr: float | None = _d("text_encoder_lr")
    prior_loss_weight: float = _d("prior_loss_weight")  # on the loss of regularisation images
    optimizer: str = _d("optimizer")
    optimizer_args: dict = field(default_factory=lambda: _d("optimizer_args"))
    weight_decay: float = _d("weight_decay")
    lr_scheduler: str = _d("lr_scheduler")
    lr_warmup_steps: int = _d("lr_warmup_steps")
    max_grad_norm: float = _d("max_grad_norm")
    seed: int = _d("seed")
    pivotal_word: str = _d("pivotal_word")           # train this word's embeddings too (pivotal.py); "": off
    pivotal_lr: float = _d("pivotal_lr")
    pivotal_steps: int = _d("pivotal_steps")         # the first N steps only (0: all)
    min_snr_gamma: float | None = _d("min_snr_gamma")
    debiased_estimation_loss: bool = _d("debiased_estimation_loss")
    ema_decay: float | None = _d("ema_decay")       # saves and samples use the LoRA's moving average (ema.py)
    min_timestep: int | None = _d("min_timestep")   # timesteps are drawn from [min_timestep, max_timestep)
    max_timestep: int | None = _d("max_timestep")
    noise_offset: float = _d("noise_offset")
    v_parameterization: bool | None = _d("v_parameterization")  # None: the model's own prediction type
    clip_skip: int | None = _d("clip_skip")         # kohya's: SD1/SD2 layer from the end (None: the last)
    v2: bool = _d("v2")                             # kohya's "this is SD2": checked against the checkpoint
    max_token_length: int | None = _d("max_token_length")  # kohya's 75/150/225 caption limit (None: no limit)
    mixed_precision: str = _d("mixed_precision")    # no, fp16, bf16 (GPU only)
    full_fp16: bool = _d("full_fp16")               # the LoRA's own weights in fp16 (half_weights.py)
    full_bf16: bool = _d("full_bf16")               # ... or in bf16
    gradient_checkpointing: bool = _d("gradient_checkpointing")  # recompute UNet blocks in backward
    # frozen layers keep less for backward (frozen_layers.py).  None: on CPU only, where they are
    # leaner and faster; a GPU step at SD sizes is bound by Python overhead, which they add to
    # (the README gives the measured trade)
    lean_frozen_layers: bool | None = _d("lean_frozen_layers")
    cache_latents: bool = _d("cache_latents")
    cache_latents_to_disk: bool = _d("cache_latents_to_disk")
    cache_text_encoder_outputs: bool = _d("cache_text_encoder_outputs")  # frozen text encoder, fixed captions
    sample_every_n_steps: int = _d("sample_every_n_steps")
    sample_every_n_epochs: int = _d("sample_every_n_epochs")  # when set, replaces sample_every_n_steps
    sample_at_first: bool = _d("sample_at_first")
    sample_sampler: str = _d("sample_sampler")      # kohya's sampler names; a prompt's --ss overrides it
    sample_prompts: list[str] = field(default_factory=lambda: _d("sample_prompts"))
    training_comment: str = _d("training_comment")
    log_with: str | None = _d("log_with")           # "tensorboard" (tensorboard.py), or None
    logging_dir: str | Path | None = _d("logging_dir")
    log_prefix: str = _d("log_prefix")

    @property
    def unet_learning_rate(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate

    def __post_init__(self) -> None:
        options.check(self, "")
        lo, hi = self.min_timestep or 0, self.max_timestep
        if hi is not None and lo >= hi:
            raise options.OptionError("min_timestep", f"must be below max_timestep ({lo} >= {hi})")
        if self.full_fp16 and self.full_bf16:  # sd-scripts silently takes full_fp16
            raise options.OptionError("full_bf16", "full_fp16 is set too: the LoRA's weights are held in one type, "
                                                   "choose fp16 or bf16")
        for name, want in (("full_fp16", "fp16"), ("full_bf16", "bf16")):  # sd-scripts' rule too
            if getattr(self, name) and self.mixed_precision != want:
                raise options.OptionError(name, f"needs mixed_precision {want} (got {self.mixed_precision}): the "
                                                f"LoRA's weights are held in the type the model computes in")
