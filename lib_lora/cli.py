"""``python -m lib_lora <command>``: the headless entry point."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import families
from .fileio import LoraFileError
from .hashes import file_hashes
from .network import load_network
from .service import tag_frequency
from .training.options import OptionError

_SUMMARY_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module",
                 "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_num_train_images",
                 "ss_max_train_steps", "ss_num_epochs", "ss_learning_rate", "ss_training_comment",
                 "modelspec.architecture", "modelspec.title", "modelspec.date")


def inspect_file(path: Path) -> dict:
    net = load_network(path)
    meta = net.metadata
    info = {
        "file": str(path),
        "format": "safetensors" if path.suffix.lower() == ".safetensors" else "pickle (tensors only)",
        "algorithms": net.algorithms(),
        "family": net.family,
        "ranks": net.ranks(),
        "alphas": net.alphas(),
        "text_encoder_modules": net.count("te"),
        "unet_modules": net.count("unet"),
        "unknown_keys": len(net.unknown_keys),
        "unusable_modules": net.errors,
        "metadata": {k: meta[k] for k in _SUMMARY_KEYS if k in meta},
        "metadata_keys": len(meta),
    }
    if meta.get("ss_tag_frequency"):
        info["top_tags"] = tag_frequency(meta, top=10)
    info.update(file_hashes(path))
    return info


def _print_inspect(info: dict) -> None:
    algos = ", ".join(f"{k} x{v}" for k, v in info["algorithms"].items())
    print(f"file        {info['file']}")
    print(f"format      {info['format']}")
    print(f"family      {families.display(info['family'])}")
    print(f"algorithms  {algos}")
    print(f"rank(s)     {', '.join(map(str, info['ranks'])) or '-'}")
    print(f"alpha(s)    {', '.join(f'{a:g}' for a in info['alphas']) or '- (scale 1)'}")
    print(f"modules     text encoder {info['text_encoder_modules']}, unet {info['unet_modules']}")
    if info["unknown_keys"]:
        print(f"unknown     {info['unknown_keys']} keys not recognised")
    for err in info["unusable_modules"][:5]:
        print(f"unusable    {err}")
    print(f"sha256      {info['sha256']}")
    print(f"AutoV2      {info['autov2']}")
    if "sshs_model_hash" in info:
        print(f"kohya hash  {info['sshs_model_hash']} (tensor data only; legacy {info['sshs_legacy_hash']})")
    if info["metadata"]:
        print(f"metadata    {info['metadata_keys']} keys")
        for k, v in info["metadata"].items():
            v = v if len(v) < 100 else v[:97] + "..."
            print(f"  {k} = {v}")
    if "top_tags" in info:
        print(f"top tags    {info['top_tags']}")


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(Path(args.file))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import write_sample_lora
    path = write_sample_lora(Path(args.out), family=args.family, rank=args.rank, overwrite=args.force)
    print(f"wrote {path}")
    return 0


# option fields whose command-line flag has another name (kohya's)
_CLI_NAMES = {"rank": "network_dim", "alpha": "network_alpha", "conv_rank": "conv_dim", "dropout": "network_dropout",
              "output_name": "out", "overwrite": "force", "train_dir": "dataset"}


def _train_config(args: argparse.Namespace):
    from .training.dataset import DatasetConfig
    from .training.jobs import check_output_name
    from .training.network import NetworkConfig
    from .training.trainer import AUTO_ON_OFF, TrainConfig

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise OptionError("out", f"{args.out!r}: LoRAs are written as .safetensors; name the file NAME.safetensors")
    check_output_name(out.stem, "out")
    ds = DatasetConfig(args.dataset, reg_dir=args.reg_dir, resolution=args.resolution,
                       enable_buckets=not args.no_buckets, min_bucket_reso=args.min_bucket_reso,
                       max_bucket_reso=args.max_bucket_reso, bucket_no_upscale=args.bucket_no_upscale,
                       caption_extension=args.caption_extension, shuffle_caption=args.shuffle_caption,
                       keep_tokens=args.keep_tokens, caption_dropout_rate=args.caption_dropout_rate,
                       caption_tag_dropout_rate=args.caption_tag_dropout_rate, flip_aug=args.flip_aug)
    net = NetworkConfig(rank=args.network_dim, alpha=args.network_alpha, conv_rank=args.conv_dim,
                        conv_alpha=args.conv_alpha, dropout=args.network_dropout,
                        train_unet=not args.text_encoder_only, train_text_encoder=not args.unet_only)
    return TrainConfig(ds, net, output_dir=out.parent, output_name=out.stem, save_precision=args.save_precision,
                       save_every_n_steps=args.save_every_n_steps, save_every_n_epochs=args.save_every_n_epochs,
                       save_last_k=args.save_last_k, save_state=args.save_state, overwrite=args.force,
                       max_train_steps=args.max_train_steps, max_train_epochs=args.max_train_epochs,
                       batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
                       learning_rate=args.learning_rate, text_encoder_lr=args.text_encoder_lr,
                       optimizer=args.optimizer, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
                       max_grad_norm=args.max_grad_norm, seed=args.seed, min_snr_gamma=args.min_snr_gamma,
                       noise_offset=args.noise_offset, mixed_precision=args.mixed_precision,
                       gradient_checkpointing=args.gradient_checkpointing,
                       lean_frozen_layers=AUTO_ON_OFF[args.lean_frozen_layers],
                       cache_latents_to_disk=args.cache_latents_to_disk,
                       cache_latents=not args.no_cache_latents, training_comment=args.training_comment)


class _Bar:
    """A one-line terminal progress bar (stderr), quiet on non-main processes."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, p) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * p.step / max(p.total, 1))
        eta = time.strftime("%M:%S", time.gmtime(p.eta)) if p.eta < 3600 else f"{p.eta / 3600:.1f}h"
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {p.step}/{p.total} loss {p.avg_loss:.4f} "
                         f"lr {p.lr:.2e} eta {eta}  ")
        if p.step == p.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .attention import sdpa_attention
    from .hosts.checkpoint import load_checkpoint
    from .training.trainer import Callbacks, Trainer

    cfg = _train_config(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.base, device=device,
                           dtype=torch.float16 if device != "cpu" and args.mixed_precision == "fp16" else torch.float32)
    model = ckpt.trainable()
    model.context = lambda: sdpa_attention(ckpt.unet)
    trainer = Trainer(model, cfg, Callbacks(on_progress=_Bar(True), log=lambda s: None))
    trainer.cb.on_progress = _Bar(trainer.is_main)
    if trainer.is_main:
        trainer.cb.log = lambda s: print(s, file=sys.stderr)
    summary = trainer.prepare(args.resume)
    if trainer.is_main:
        print(f"dataset: {summary['train_images']} images, {summary['steps_per_epoch']} steps/epoch, "
              f"{trainer.total_steps()} steps, processes {trainer.world}", file=sys.stderr)
    res = trainer.run(resume_from=args.resume)
    if trainer.is_main:
        print(f"wrote {res.output}" if res.output else "stopped without saving")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .hosts.checkpoint import load_checkpoint, sample
    from .library import Library
    from .params import parse_prompt
    from .runtime import Runtime

    ckpt = load_checkpoint(args.base)
    bad_tokens: list[str] = []
    prompt, requests = parse_prompt(args.prompt, errors=bad_tokens)
    rt = Runtime(Library(args.lora_dir or [Path(".")]))
    from .modelmap import ModelMap
    rt.set_model(ModelMap.build(ckpt.family, ckpt.unet, ckpt.text_encoders))
    res = rt.activate(requests)
    for m in bad_tokens + res.messages:
        print(f"warning: {m}", file=sys.stderr)
    try:
        images = sample(ckpt, [prompt] * args.n, negative=args.negative, steps=args.steps, cfg=args.cfg,
                        seed=args.seed, width=args.width, height=args.height, sampler=args.sampler)
    finally:
        rt.restore()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        img.save(path)
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_lora", description="LoRA Workshop command line")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("inspect", help="describe a LoRA/LyCORIS file")
    sp.add_argument("file")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_inspect)
    sp = sub.add_parser("sample", help="write a small kohya-format LoRA for a tiny SD model")
    sp.add_argument("out")
    sp.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")  # the tiny models that exist
    sp.add_argument("--rank", type=int, default=4)
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("train", help="train a LoRA on a single-file SD1/SD2/SDXL checkpoint (kohya-style folders)")
    sp.add_argument("dataset", help="folder with <repeats>_<trigger> sub-folders")
    sp.add_argument("--base", required=True, help="single-file .safetensors checkpoint (a .yaml beside it is read)")
    sp.add_argument("--out", required=True, help="output .safetensors path")
    sp.add_argument("--reg-dir")
    sp.add_argument("--resolution", default="512")
    sp.add_argument("--no-buckets", action="store_true")
    sp.add_argument("--min-bucket-reso", type=int, default=256)
    sp.add_argument("--max-bucket-reso", type=int, default=1024)
    sp.add_argument("--bucket-no-upscale", action="store_true")
    sp.add_argument("--caption-extension", default=".txt")
    sp.add_argument("--shuffle-caption", action="store_true")
    sp.add_argument("--keep-tokens", type=int, default=0)
    sp.add_argument("--caption-dropout-rate", type=float, default=0.0)
    sp.add_argument("--caption-tag-dropout-rate", type=float, default=0.0)
    sp.add_argument("--flip-aug", action="store_true")
    sp.add_argument("--network-dim", type=int, default=16)
    sp.add_argument("--network-alpha", type=float, default=8.0)
    sp.add_argument("--conv-dim", type=int, default=0, help="LoCon rank for resnet convs (0: off)")
    sp.add_argument("--conv-alpha", type=float, default=1.0)
    sp.add_argument("--network-dropout", type=float, default=0.0)
    sp.add_argument("--unet-only", action="store_true")
    sp.add_argument("--text-encoder-only", action="store_true")
    sp.add_argument("--max-train-steps", type=int, default=1000)
    sp.add_argument("--max-train-epochs", type=int)
    sp.add_argument("--batch-size", type=int, default=1)
    sp.add_argument("--gradient-accumulation-steps", type=int, default=1)
    sp.add_argument("--learning-rate", type=float, default=1e-4)
    sp.add_argument("--text-encoder-lr", type=float)
    sp.add_argument("--optimizer", default="AdamW", help="AdamW, AdamW8bit, Lion, Prodigy")
    sp.add_argument("--lr-scheduler", default="constant", choices=["constant", "constant_with_warmup", "cosine", "linear"])
    sp.add_argument("--lr-warmup-steps", type=int, default=0)
    sp.add_argument("--max-grad-norm", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--min-snr-gamma", type=float)
    sp.add_argument("--noise-offset", type=float, default=0.0)
    sp.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    sp.add_argument("--no-cache-latents", action="store_true")
    sp.add_argument("--cache-latents-to-disk", action="store_true", help="keep latents next to the images for reuse")
    sp.add_argument("--gradient-checkpointing", action="store_true")
    sp.add_argument("--lean-frozen-layers", default="auto", choices=["auto", "on", "off"],
                    help="frozen layers keep less for backward: less memory; auto = on CPU only (they slow a GPU step)")
    sp.add_argument("--save-precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    sp.add_argument("--save-every-n-steps", type=int, default=0)
    sp.add_argument("--save-every-n-epochs", type=int, default=0)
    sp.add_argument("--save-last-k", type=int, default=0)
    sp.add_argument("--save-state", action="store_true", help="also write resumable training state")
    sp.add_argument("--resume", help="a .state.safetensors file written by --save-state")
    sp.add_argument("--training-comment", default="")
    sp.add_argument("--device")
    sp.add_argument("--force", action="store_true", help="overwrite an existing output file")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("render", help="txt2img on a single-file checkpoint, with <lora:...> tokens")
    sp.add_argument("prompt")
    sp.add_argument("--base", required=True)
    sp.add_argument("--lora-dir", action="append", type=Path)
    sp.add_argument("--out", default="render.png")
    sp.add_argument("--negative", default="")
    sp.add_argument("--steps", type=int, default=20)
    sp.add_argument("--cfg", type=float, default=7.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--n", type=int, default=1)
    sp.add_argument("--width", type=int)
    sp.add_argument("--height", type=int)
    sp.add_argument("--sampler", default="ddim", choices=["ddim", "euler"])
    sp.set_defaults(func=cmd_render)

    from .toyworld.demo import add_parser as add_demo_parser
    add_demo_parser(sub)
    from .tools.cli import add_parsers as add_tool_parsers
    add_tool_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .hosts.checkpoint import ArchitectureError
    from .adapters import AdapterError
    from .tools.common import ToolError
    from .training.dataset import DatasetError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OptionError as e:
        print(f"error: --{_CLI_NAMES.get(e.option, e.option).replace('_', '-')}: {e.detail}", file=sys.stderr)
        return 2
    except (LoraFileError, FileExistsError, FileNotFoundError, IsADirectoryError, PermissionError,
            DatasetError, ArchitectureError, ToolError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
