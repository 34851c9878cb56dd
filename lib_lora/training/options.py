"""The training options, declared once: the command line, the tab, the API and the metadata read them here.

Each ``Option`` is one field of ``TrainConfig`` (key ``name``), ``DatasetConfig`` (``dataset.name``)
or ``NetworkConfig`` (``network.name``): its type, default, allowed values and bounds, the tab's
label and section, the command-line flag, kohya-ss/sd-scripts' spelling (``train_network.py``)
and the ``ss_*`` metadata key that holds exactly its value.  The dataclasses take their defaults
from here and check their values with ``check``; ``cli.py`` builds the ``train`` parser, ``ui.py``
the form and ``request.py`` its coercion from the same list, so adding an option touches this
file (and the dataclass field that carries it).

A refused value raises ``OptionError`` naming the option by its field name; each surface spells
that name its own way (``--network-dim`` on the command line, ``network.rank`` in the API) but
the rule and the reason are the same.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import (CLIP_SKIP_MAX, KOHYA_SAMPLERS, OPTIMIZER_NAMES, OPTIMIZERS, OptionError, check_logging,
                     check_optimizer, check_pivotal_word, integer, number)

__all__ = ["Option", "OPTIONS", "GROUPS", "OptionError", "OPTIMIZERS", "OPTIMIZER_NAMES", "check_optimizer",
           "integer", "number", "option", "by_name", "section", "default", "check", "AUTO_ON_OFF",
           "SCHEDULERS", "REQUIRED", "NOT_IMPLEMENTED", "KOHYA_NOTED", "kohya_noted"]

REQUIRED = object()  # the default of an option that has none (the dataset folder)

# how the tab and the CLI spell a ``bool | None`` option such as ``lean_frozen_layers``
AUTO_ON_OFF: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")

# the tab's sections, in order, and whether each starts open
GROUPS: list[tuple[str, bool]] = [("Dataset", True), ("Network", False), ("Optimizer and schedule", False),
                                  ("Saving", False), ("Sample images", False), ("Advanced", False)]


@dataclass(frozen=True)
class Option:
    key: str                    # request key: "learning_rate", "dataset.train_dir", "network.rank"
    type: Any                   # the dataclass field's type
    default: Any
    label: str = ""             # the tab's label; "" = not on the tab
    group: str = ""             # the tab's section (GROUPS)
    kind: str = ""              # the tab's widget; derived from ``type`` when empty (see ``form_kind``)
    choices: tuple = ()         # the values the config accepts
    form_choices: tuple | None = None   # what the tab offers (default: ``choices``)
    minimum: float | None = None        # numbers: the lowest value (or the bound, with ``above``)
    above: bool = False
    maximum: float | None = None
    help: str = ""              # the command line's help
    flag: str | None = None     # the ``train`` subcommand's flag ("--network-dim", or "dataset": positional)
    flag_action: str = ""       # "store_true", or "store_false" for a flag that turns the option off
    cli_choices: tuple | None = None    # argparse's choices (default: ``choices``; () = checked later)
    kohya: str | None = None    # sd-scripts' name for it (train_network.py argument or dataset config key)
    kohya_note: str = ""        # how kohya's differs: "inverted", "network_args", "optimizer_args", "file"
    ss: str | None = None       # the ss_* metadata key that holds exactly this value

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]

    def default_value(self) -> Any:
        return copy.deepcopy(self.default) if isinstance(self.default, (list, dict)) else self.default

    @property
    def form_kind(self) -> str:
        if self.kind:
            return self.kind
        return {bool: "bool", int: "int", float: "float", int | None: "opt_int", float | None: "opt_float",
                bool | None: "auto_bool", list[str]: "textarea"}.get(self.type, "choice" if self.choices else "text")


def _o(key: str, type_: Any, default: Any, label: str = "", group: str = "", **kw: Any) -> Option:
    return Option(key, type_, default, label, group, **kw)


_IO, _D, _N = "Input and output", "Dataset", "Network"  # _IO: the command line's section for paths
_OPT, _SAVE, _SAMPLE, _ADV = "Optimizer and schedule", "Saving", "Sample images", "Advanced"

# In the tab's order; options without a label are not on the tab (their group places them in
# the command line's --help).
OPTIONS: list[Option] = [
    _o("output_name", str, "lora", group=_IO, kohya="output_name", ss="ss_output_name",
       help="the LoRA's name: NAME.safetensors in --output_dir (or give --out)"),
    _o("output_dir", str | Path, ".", group=_IO, kohya="output_dir", help="the folder --output_name is written to"),
    _o("network_weights", str | Path | None, None, group=_IO, flag="--network-weights", kohya="network_weights",
       help="start from this LoRA/LoCon file's weights (same rank, alpha and layers)"),
    # -- Dataset
    _o("dataset.train_dir", str | Path | None, REQUIRED, "Dataset folder", _D, flag="dataset", kohya="train_data_dir",
       help="folder with <repeats>_<trigger> sub-folders"),
    _o("dataset.reg_dir", str | Path | None, None, "Regularisation folder (optional)", _D, kind="text",
       flag="--reg-dir", kohya="reg_data_dir", help="regularisation images, in <repeats>_<class> sub-folders"),
    _o("prior_loss_weight", float, 1.0, "Regularisation loss weight", _D, minimum=0, flag="--prior-loss-weight",
       kohya="prior_loss_weight", ss="ss_prior_loss_weight", help="weight of the regularisation images' loss"),
    _o("dataset.resolution", int | str | tuple[int, int], 512, "Resolution", _D, kind="int", flag="--resolution",
       kohya="resolution", help="training size: 512, or W,H"),
    _o("dataset.enable_buckets", bool, True, "Aspect ratio buckets", _D, flag="--no-buckets",
       flag_action="store_false", kohya="enable_bucket", ss="ss_enable_bucket",
       help="turn aspect-ratio buckets off: every image is cropped to the resolution (buckets are on by default)"),
    _o("dataset.min_bucket_reso", int, 256, "Smallest bucket side", _D, flag="--min-bucket-reso",
       kohya="min_bucket_reso", ss="ss_min_bucket_reso", help="smallest bucket side, in pixels"),
    _o("dataset.max_bucket_reso", int, 1024, "Largest bucket side", _D, flag="--max-bucket-reso",
       kohya="max_bucket_reso", ss="ss_max_bucket_reso", help="largest bucket side, in pixels"),
    _o("dataset.caption_extension", str, ".txt", "Caption extension", _D, flag="--caption-extension",
       kohya="caption_extension", help="caption files' extension (.caption is read too)"),
    _o("dataset.shuffle_caption", bool, False, "Shuffle caption tags", _D, flag="--shuffle-caption",
       flag_action="store_true", kohya="shuffle_caption", ss="ss_shuffle_caption",
       help="shuffle the caption's tags (after the first --keep-tokens)"),
    _o("dataset.keep_tokens", int, 0, "Keep first N tags in place", _D, flag="--keep-tokens", kohya="keep_tokens",
       ss="ss_keep_tokens", help="tags at the start that shuffling leaves in place"),
    _o("dataset.caption_dropout_rate", float, 0.0, "Caption dropout rate", _D, flag="--caption-dropout-rate",
       kohya="caption_dropout_rate", ss="ss_caption_dropout_rate",
       help="chance of training an image with an empty caption"),
    _o("dataset.flip_aug", bool, False, "Random horizontal flip", _D, flag="--flip-aug", flag_action="store_true",
       kohya="flip_aug", ss="ss_flip_aug", help="flip images horizontally at random"),
    _o("dataset.random_crop", bool, False, "Random crop", _D, flag="--random-crop", flag_action="store_true",
       kohya="random_crop", ss="ss_random_crop", help="crop at random instead of the centre (latents are then not cached)"),
    _o("dataset.color_aug", bool, False, "Random colour change (hue or gamma)", _D, flag="--color-aug",
       flag_action="store_true", kohya="color_aug", ss="ss_color_aug",
       help="sd-scripts' colour augmentation: each time an image is trained, one time in three its hue is turned by "
            "up to 16 degrees or its 0-255 values raised to a power in [0.95, 1.05], clipped at 255 (latents are then "
            "encoded at every step, not cached)"),
    # -- Network
    _o("network.module", str, "networks.lora", group=_N, choices=("networks.lora",), kohya="network_module",
       ss="ss_network_module", help="the network kind: networks.lora (LoRA; LoCon with conv_dim) is the one here"),
    _o("network.rank", int, 16, "Rank (dim)", _N, minimum=1, flag="--network-dim", kohya="network_dim",
       ss="ss_network_dim", help="LoRA rank (dim)"),
    _o("network.alpha", float, 8.0, "Alpha", _N, minimum=0, flag="--network-alpha", kohya="network_alpha",
       ss="ss_network_alpha", help="LoRA alpha: the weights are scaled by alpha / rank"),
    _o("network.conv_rank", int, 0, "Conv rank (LoCon; 0 = off)", _N, minimum=0, flag="--conv-dim",
       kohya="conv_dim", kohya_note="network_args", help="LoCon rank for resnet convs (0: off)"),
    _o("network.conv_alpha", float, 1.0, "Conv alpha", _N, minimum=0, flag="--conv-alpha", kohya="conv_alpha",
       kohya_note="network_args", help="LoCon alpha"),
    _o("network.dropout", float, 0.0, "Dropout", _N, minimum=0, maximum=0.999, flag="--network-dropout",
       kohya="network_dropout", help="dropout on the LoRA's rank dimension (0: off)"),
    _o("network.train_unet", bool, True, "Train the UNet", _N, flag="--text-encoder-only",
       flag_action="store_false", kohya="network_train_text_encoder_only", kohya_note="inverted",
       help="train the text encoder(s) only"),
    _o("network.train_text_encoder", bool, True, "Train the text encoder(s)", _N, flag="--unet-only",
       flag_action="store_false", kohya="network_train_unet_only", kohya_note="inverted",
       help="train the UNet only"),
    # pivotal tuning (pivotal.py) is not in sd-scripts: no kohya spelling, and keys of ours in the metadata,
    # written only when it is on
    _o("pivotal_word", str, "", "Pivotal tuning: a caption word whose embedding trains too (empty = off)", _N,
       flag="--pivotal-word", ss="ss_pivotal_word",
       help="train this caption word's own token embeddings beside the LoRA (pivotal tuning) and bundle them in "
            "every saved file, where the WebUI (built-in Lora or this extension) loads them as an embedding of "
            "that name whenever the LoRA is used: a new trigger word the text encoder learns to stand for the "
            "concept. Letters, digits, - and _ (default: off). Not in sd-scripts"),
    _o("pivotal_lr", float, 5e-3, "Pivotal tuning: learning rate", _N, minimum=0, above=True, flag="--pivotal-lr",
       ss="ss_pivotal_lr", help="the word's embeddings' own AdamW learning rate, constant, no weight decay"),
    _o("pivotal_steps", int, 0, "Pivotal tuning: train the embedding for the first N steps (0 = all)", _N,
       minimum=0, flag="--pivotal-steps", ss="ss_pivotal_steps",
       help="train the word's embeddings for the first N steps only, then keep them as they are (the captions' "
            "encodings can then be cached, which makes the steps after cheaper) (default: 0, the whole run)"),
    # -- Optimizer and schedule
    _o("optimizer", str, "AdamW", "Optimizer", _OPT, choices=tuple(OPTIMIZER_NAMES), cli_choices=(),
       flag="--optimizer", kohya="optimizer_type", help=", ".join(OPTIMIZER_NAMES)),
    _o("learning_rate", float, 1e-4, "Learning rate", _OPT, minimum=0, above=True, flag="--learning-rate",
       kohya="learning_rate", ss="ss_learning_rate",
       help="learning rate, of the UNet and the text encoder unless they have their own"),
    _o("unet_lr", float | None, None, "UNet learning rate (0 = same)", _OPT, minimum=0, above=True,
       flag="--unet-lr", kohya="unet_lr", ss="ss_unet_lr", help="the UNet's learning rate (default: --learning-rate)"),
    _o("text_encoder_lr", float | None, None, "Text encoder learning rate (0 = same)", _OPT, minimum=0,
       flag="--text-encoder-lr", kohya="text_encoder_lr", ss="ss_text_encoder_lr",
       help="the text encoder's learning rate (default: --learning-rate)"),
    _o("lr_scheduler", str, "constant", "Scheduler", _OPT, choices=SCHEDULERS, flag="--lr-scheduler",
       kohya="lr_scheduler", ss="ss_lr_scheduler", help="learning-rate schedule"),
    _o("lr_warmup_steps", int, 0, "Warm-up steps", _OPT, minimum=0, flag="--lr-warmup-steps",
       kohya="lr_warmup_steps", ss="ss_lr_warmup_steps", help="steps of linear warm-up"),
    _o("max_train_epochs", int | None, None, "Epochs (0 = use max steps)", _OPT, minimum=1,
       flag="--max-train-epochs", kohya="max_train_epochs",
       help="train this many epochs; replaces --max-train-steps (default: use the steps)"),
    _o("max_train_steps", int, 1000, "Max steps", _OPT, minimum=1, flag="--max-train-steps",
       kohya="max_train_steps", help="optimiser steps to train"),
    _o("batch_size", int, 1, "Batch size", _OPT, minimum=1, flag="--batch-size", kohya="train_batch_size",
       ss="ss_batch_size_per_device", help="images per batch (per process)"),
    _o("gradient_accumulation_steps", int, 1, "Gradient accumulation", _OPT, minimum=1,
       flag="--gradient-accumulation-steps", kohya="gradient_accumulation_steps",
       ss="ss_gradient_accumulation_steps", help="batches per optimiser step"),
    _o("weight_decay", float, 0.01, "Weight decay", _OPT, minimum=0, flag="--weight-decay", kohya="weight_decay",
       kohya_note="optimizer_args", help="the optimiser's weight decay (kohya: --optimizer_args weight_decay=...)"),
    _o("max_grad_norm", float, 1.0, "Max gradient norm (0 = off)", _OPT, minimum=0, flag="--max-grad-norm",
       kohya="max_grad_norm", ss="ss_max_grad_norm", help="clip the gradient to this norm (0: off)"),
    # -- Saving
    _o("save_precision", str, "fp16", "Save as", _SAVE, choices=("fp16", "bf16", "fp32", "float"),
       form_choices=("fp16", "bf16", "fp32"), flag="--save-precision", kohya="save_precision",
       help="the saved tensors' type (float = fp32)"),
    _o("save_model_as", str, "safetensors", group=_SAVE, choices=("safetensors",), kohya="save_model_as",
       help="the file format: safetensors is the one here"),
    _o("save_every_n_epochs", int, 0, "Save every N epochs (0 = off)", _SAVE, minimum=0,
       flag="--save-every-n-epochs", kohya="save_every_n_epochs",
       help="also save every N epochs, as NAME-000004.safetensors (0: off)"),
    _o("save_every_n_steps", int, 0, "Save every N steps (0 = off)", _SAVE, minimum=0,
       flag="--save-every-n-steps", kohya="save_every_n_steps",
       help="also save every N steps, as NAME-step00001234.safetensors (0: off)"),
    _o("save_last_k", int, 0, "Keep last K intermediate files (0 = all)", _SAVE, minimum=0, flag="--save-last-k",
       help="keep only the newest K intermediate saves (0: all)"),
    _o("save_state", bool, False, "Save resumable state with each file", _SAVE, flag="--save-state",
       flag_action="store_true", kohya="save_state",
       help="also write resumable training state beside each save (NAME-state.safetensors)"),
    _o("overwrite", bool, False, "Overwrite an existing file of that name", _SAVE, flag="--force",
       flag_action="store_true", help="overwrite existing output files"),
    _o("training_comment", str, "", "Comment (stored in the file)", _SAVE, flag="--training-comment",
       kohya="training_comment", help="a comment stored in the file's metadata"),
    # -- Sample images (sample_prompts.py reads the prompts and names the images)
    _o("sample_every_n_steps", int, 0, "Every N steps (0 = off)", _SAMPLE, minimum=0, flag="--sample-every-n-steps",
       kohya="sample_every_n_steps", help="render the sample prompts every N steps (0: off)"),
    _o("sample_every_n_epochs", int, 0, "Every N epochs (0 = off; replaces steps)", _SAMPLE, minimum=0,
       flag="--sample-every-n-epochs", kohya="sample_every_n_epochs",
       help="render the sample prompts every N epochs, instead of every N steps (0: off)"),
    _o("sample_at_first", bool, False, "Also before the first step", _SAMPLE, flag="--sample-at-first",
       flag_action="store_true", kohya="sample_at_first", help="also render the sample prompts before training"),
    _o("sample_sampler", str, "ddim", "Sampler (kohya's names)", _SAMPLE, choices=KOHYA_SAMPLERS,
       flag="--sample-sampler", kohya="sample_sampler",
       help="the samples' sampler, unless a prompt's --ss names another (the command line renders ddim and euler)"),
    _o("sample_prompts", list[str], [],
       "Prompts, one per line (kohya options: --n negative --w --h --s steps --l cfg --d seed --ss sampler)",
       _SAMPLE, kohya="sample_prompts", kohya_note="file",
       help="kohya's prompt file: one prompt per line with --n --w --h --s --l --d --ss (or .json/.toml)"),
    # -- Advanced
    _o("mixed_precision", str, "no", "Mixed precision", _ADV, choices=("no", "fp16", "bf16"),
       form_choices=("auto", "no", "fp16", "bf16"), flag="--mixed-precision", kohya="mixed_precision",
       ss="ss_mixed_precision", help="compute in half precision on a GPU"),
    _o("full_fp16", bool, False, "Full fp16: the LoRA's weights themselves in fp16 (needs mixed precision fp16)",
       _ADV, flag="--full-fp16", flag_action="store_true", kohya="full_fp16", ss="ss_full_fp16",
       help="train the LoRA's weights, gradients and optimiser state in fp16, with no fp32 copy (needs "
            "--mixed-precision fp16): half their memory, but fp16 rounds small gradients and Adam's moments to "
            "zero (so AdamW's eps defaults to 1e-4 here); a loss scale and a guard skip any step that would make a "
            "weight non-finite"),
    _o("full_bf16", bool, False, "Full bf16: the LoRA's weights themselves in bf16 (needs mixed precision bf16)",
       _ADV, flag="--full-bf16", flag_action="store_true", kohya="full_bf16",
       help="train the LoRA's weights, gradients and optimiser state in bf16, with no fp32 copy (needs "
            "--mixed-precision bf16): half their memory, but bf16's 8 significant bits lose updates smaller than "
            "about 1/256 of a weight; a guard skips any step that would make a weight non-finite"),
    _o("seed", int, 42, "Seed", _ADV, flag="--seed", kohya="seed", ss="ss_seed",
       help="seed of the initialisation, the noise and the order"),
    _o("min_snr_gamma", float | None, None, "Min-SNR gamma (0 = off)", _ADV, minimum=0, above=True,
       flag="--min-snr-gamma", kohya="min_snr_gamma", ss="ss_min_snr_gamma",
       help="min-SNR loss weighting, e.g. 5 (default: off)"),
    _o("debiased_estimation_loss", bool, False, "Debiased estimation loss", _ADV, flag="--debiased-estimation-loss",
       flag_action="store_true", kohya="debiased_estimation_loss", ss="ss_debiased_estimation",
       help="weight each step's loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), SNR capped at 1000: "
            "the noisiest steps, where composition and shape are decided, count most"),
    # sd-scripts (v0.10.1) has no EMA for networks: no kohya spelling, and a key of ours in the metadata
    _o("ema_decay", float | None, None, "EMA of the LoRA weights: decay (0 = off)", _ADV, minimum=0, above=True,
       maximum=0.9999, flag="--ema-decay", ss="ss_ema_decay",
       help="keep an exponential moving average of the LoRA's weights at this decay, e.g. 0.99 (averages over "
            "about 1/(1-decay) steps, debiased from the first step); every saved file and every sample uses the "
            "average. Not in sd-scripts (default: off)"),
    # sd-scripts' bounds: the schedule's 1000 training timesteps, drawn from [min, max)
    _o("min_timestep", int | None, None, "Lowest training timestep (0 = from the first)", _ADV, minimum=0, maximum=999,
       flag="--min-timestep", kohya="min_timestep", help="draw training timesteps from [min, max) only (default: 0)"),
    _o("max_timestep", int | None, None, "Highest training timestep, exclusive (0 = to the last)", _ADV, minimum=1,
       maximum=1000, flag="--max-timestep", kohya="max_timestep",
       help="draw training timesteps below this only (default: the scheduler's 1000)"),
    _o("noise_offset", float, 0.0, "Noise offset", _ADV, minimum=0, flag="--noise-offset", kohya="noise_offset",
       help="noise offset, e.g. 0.05 (0: off)"),
    _o("v_parameterization", bool | None, None, group=_ADV, flag="--v-parameterization", flag_action="store_true",
       kohya="v_parameterization", help="the model predicts v (default: as the model says)"),
    # sd-scripts needs --v2 to load SD2; here the family is read from the weights, so it only confirms
    # it (the tab ticks it for a loaded SD2 model; a tick on another model is refused before queuing)
    _o("v2", bool, False, "SD2 model (kohya's v2: only confirms the loaded model; refused if it is not SD2)", _ADV,
       kohya="v2", help="kohya's \"this is SD2\": the family is detected from the checkpoint here, so this only "
                        "confirms it (refused when the checkpoint is not SD2)"),
    _o("clip_skip", int | None, None, "Clip skip (0 = unset: the last layer; SD1/SD2)", _ADV, minimum=1,
       maximum=CLIP_SKIP_MAX, flag="--clip-skip", kohya="clip_skip", ss="ss_clip_skip",
       help="SD1/SD2: condition on the text encoder's Nth layer from the end (2 is common for anime models; "
            "SDXL ignores it, as sd-scripts does) (default: unset, the last layer)"),
    # in the WebUI, through its own prompt chunking (webui_trainable.caption_chunks)
    _o("max_token_length", int | None, None,
       "Caption tokens (kohya's max_token_length: 75, 150 or 225; 0 = no limit, as WebUI prompts)", _ADV,
       choices=(75, 150, 225), flag="--max-token-length", kohya="max_token_length", ss="ss_max_token_length",
       help="kohya's caption length: 75 truncates to one 75-token chunk (sd-scripts' default), 150 and 225 to "
            "two and three; every caption then gets that many chunks (default: unset, no limit: long captions "
            "get as many chunks as they need, as WebUI prompts do)"),
    _o("cache_latents", bool, True, "Cache latents", _ADV, flag="--no-cache-latents", flag_action="store_false",
       kohya="cache_latents", ss="ss_cache_latents",
       help="encode the images at every step instead of caching their latents (cached by default)"),
    _o("cache_text_encoder_outputs", bool, True, "Cache text encoder outputs (frozen TE, fixed captions)", _ADV,
       flag="--no-cache-text-encoder-outputs", flag_action="store_false", kohya="cache_text_encoder_outputs",
       help="encode the captions at every step instead of caching the frozen text encoders' outputs (cached by "
            "default when the captions never vary)"),
    _o("gradient_checkpointing", bool, False, "Gradient checkpointing (less memory, about 30% slower)", _ADV,
       flag="--gradient-checkpointing", flag_action="store_true", kohya="gradient_checkpointing",
       ss="ss_gradient_checkpointing", help="recompute UNet blocks in backward: less memory, slower"),
    _o("lean_frozen_layers", bool | None, None,
       "Lean frozen layers (less memory; auto: on CPU for SD-sized models, as they slow a GPU step)", _ADV,
       flag="--lean-frozen-layers", cli_choices=tuple(AUTO_ON_OFF),
       help="frozen layers keep less for backward: less memory; auto = on CPU for SD-sized models only "
            "(they slow a GPU step)"),
    _o("dataset.bucket_reso_steps", int, 64, "Bucket step", _ADV, flag="--bucket-reso-steps",
       kohya="bucket_reso_steps", help="bucket sides are multiples of this"),
    _o("dataset.bucket_no_upscale", bool, False, "Never upscale into a bucket", _ADV, flag="--bucket-no-upscale",
       flag_action="store_true", kohya="bucket_no_upscale", ss="ss_bucket_no_upscale",
       help="never enlarge an image to fit a bucket"),
    # -- not on the tab
    _o("dataset.caption_tag_dropout_rate", float, 0.0, group=_D, flag="--caption-tag-dropout-rate",
       kohya="caption_tag_dropout_rate", ss="ss_caption_tag_dropout_rate", help="chance of dropping each tag"),
    _o("dataset.caption_dropout_every_n_epochs", int, 0, group=_D, kohya="caption_dropout_every_n_epochs",
       ss="ss_caption_dropout_every_n_epochs", help="train without captions every N-th epoch (0: never)"),
    _o("dataset.keep_tokens_separator", str, "", group=_D, kohya="keep_tokens_separator",
       help="marks the end of the kept tags instead of --keep-tokens, e.g. |||"),
    _o("dataset.caption_separator", str, ",", group=_D, kohya="caption_separator", help="separates a caption's tags"),
    _o("dataset.max_pixels", int, 64_000_000),
    # kohya's dataset config ([[datasets]] of [[datasets.subsets]], subsets.py): the command line's
    # --dataset_config file, the API's dataset_toml, or this list in its JSON form
    _o("dataset.datasets", list[dict], [], kohya="datasets", kohya_note="dataset_config",
       help="kohya's [[datasets]], each with its [[datasets.subsets]] (image folders)"),
    _o("optimizer_args", dict, {}, kohya="optimizer_args", kohya_note="optimizer_args"),
    _o("cache_latents_to_disk", bool, False, group=_ADV, flag="--cache-latents-to-disk", flag_action="store_true",
       kohya="cache_latents_to_disk", help="keep latents next to the images for reuse"),
    _o("log_with", str | None, None, group=_ADV, choices=("tensorboard",), cli_choices=(), kohya="log_with",
       help="tensorboard: log the loss, the learning rates and the samples (needs the tensorboard package)"),
    _o("logging_dir", str | Path | None, None, group=_ADV, kohya="logging_dir",
       help="the folder TensorBoard logs go to (LOGGING_DIR/<prefix><time>/network_train); alone, it means "
            "log_with tensorboard"),
    _o("log_prefix", str, "", group=_ADV, kohya="log_prefix", help="put before the time in the log folder's name"),
]

# kohya options accepted with the value that matches what this trainer does, refused otherwise
# (option key -> the reason; none at present)
NOT_IMPLEMENTED: dict[str, str] = {}

# kohya options that set nothing here: taken on the command line and in config files, and answered
# with one line on what this trainer does instead.  kohya's name -> (int for a value, None for a
# switch; the line).
_ATTENTION = ("attention already runs fused here: PyTorch's scaled_dot_product_attention on the command line, "
              "the WebUI's own cross-attention optimisation (Settings > Optimizations) in the WebUI")
_WORKERS = ("no data-loader worker processes here: latents and text-encoder outputs are cached before the first "
            "step, and images that are not are read in the training process")
KOHYA_NOTED: dict[str, tuple[type | None, str]] = {
    "xformers": (None, _ATTENTION), "sdpa": (None, _ATTENTION), "mem_eff_attn": (None, _ATTENTION),
    "max_data_loader_n_workers": (int, _WORKERS), "persistent_data_loader_workers": (None, _WORKERS),
}


def kohya_noted(name: str, value: Any) -> str | None:
    """The line for kohya's ``name`` given as ``value`` (None when a switch is off)."""
    kind, line = KOHYA_NOTED[name]
    if kind is None:
        if not isinstance(value, bool):
            raise OptionError(name, f"expected true or false, got {value!r}")
        return f"{name}: {line}" if value else None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise OptionError(name, f"expected a whole number, got {value!r}")
    return f"{name} {value}: {line}"

_BY_KEY = {o.key: o for o in OPTIONS}
_BY_NAME = {o.name: o for o in OPTIONS}
assert len(_BY_KEY) == len(_BY_NAME) == len(OPTIONS), "option names must be unique across the three sets"


def option(key: str) -> Option:
    """The option with request key ``key`` ("network.rank")."""
    return _BY_KEY[key]


def by_name(name: str) -> Option | None:
    """The option whose field is called ``name`` (OptionError's ``option``); None if there is none."""
    return _BY_NAME.get(name)


def section(name: str) -> list[Option]:
    """The options of one set: "" (TrainConfig), "dataset" or "network"."""
    return [o for o in OPTIONS if o.section == name]


def default(key: str) -> Any:
    """A dataclass field's default (a fresh copy for lists and dicts)."""
    return _BY_KEY[key].default_value()


def check(obj: Any, set_name: str) -> None:
    """OptionError for the first field of ``obj`` (one option set) outside its choices or bounds."""
    for o in section(set_name):
        value = getattr(obj, o.name)
        if o.key == "log_with":
            check_logging(value, obj.logging_dir)  # also: is its package installed
            continue
        if o.key == "pivotal_word":
            check_pivotal_word(value)
            continue
        if value is None and o.default is None:
            continue
        if o.key == "optimizer":
            check_optimizer(value)  # also: is its package installed
        elif o.choices and value not in o.choices:
            raise OptionError(o.name, f"must be one of {', '.join(map(str, o.choices))} (got {value!r})")
        elif o.key in NOT_IMPLEMENTED and value != o.default_value() and \
                not (o.maximum is not None and value == o.maximum):
            raise OptionError(o.name, f"{NOT_IMPLEMENTED[o.key]} (got {value!r})")
        elif o.minimum is not None:
            if o.type in (int, int | None):
                integer(o.name, value, int(o.minimum), None if o.maximum is None else int(o.maximum))
            else:
                number(o.name, value, o.minimum, above=o.above, maximum=o.maximum)
