"""``python -m lib_lora <command>``: the headless entry point."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import families
from .fileio import LoraFileError
from .hashes import file_hashes
from .network import load_network
from .service import tag_frequency

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib_lora", description="LoRA Workshop command line")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("inspect", help="describe a LoRA/LyCORIS file")
    sp.add_argument("file")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_inspect)
    sp = sub.add_parser("sample", help="write a small kohya-format LoRA for a tiny SD model")
    sp.add_argument("out")
    sp.add_argument("--family", choices=families.FAMILY_NAMES, default="sd1")
    sp.add_argument("--rank", type=int, default=4)
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(func=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LoraFileError, FileExistsError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
