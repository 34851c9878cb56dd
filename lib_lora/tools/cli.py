"""``python -m lib_lora resize|merge|bake|extract|convert``: the tools' command-line options."""
from __future__ import annotations

import argparse

from ..families import UNET_FAMILIES
from .common import SAVE_DTYPES

_FMT = argparse.ArgumentDefaultsHelpFormatter
_SPEC = "FILE[:te[:unet[:dyn]]] or FILE:te=W:unet=W (the numbers of <lora:name:...>)"


def _dtype(value: str):
    return None if value == "keep" else SAVE_DTYPES[value]


def _rank_options(sp: argparse.ArgumentParser, rank_default, rank_help: str) -> None:
    sp.add_argument("--rank", type=int, default=rank_default, help=rank_help)
    sp.add_argument("--conv-rank", type=int, default=None,
                    help="rank of 3x3 conv layers (LoCon); default: the same as --rank")
    sp.add_argument("--dynamic-method", choices=["sv_ratio", "sv_fro", "sv_cumulative"], default=None,
                    help="choose each layer's rank (at most --rank): singular values above max/ratio, the "
                         "fraction of the Frobenius norm kept, or the fraction of the singular-value sum")
    sp.add_argument("--dynamic-param", type=float, default=None, help="the ratio or fraction for --dynamic-method")
    sp.add_argument("--device", default=None, help="where SVDs run (default: cuda when available, else cpu)")


def _delta_options(sp: argparse.ArgumentParser, family: dict) -> None:
    """What resize and merge share about the deltas they decompose: dropped layers, the base, the family."""
    sp.add_argument("--min-norm", type=float, default=0.0, help="drop layers whose delta's Frobenius norm is below this")
    sp.add_argument("--base", help="checkpoint whose weights DoRA/OFT/IA3 deltas depend on")
    sp.add_argument("--family", **family)


def _common(sp: argparse.ArgumentParser, dtype_default: str) -> None:
    sp.add_argument("--dtype", choices=["fp16", "bf16", "fp32"] + (["keep"] if dtype_default == "keep" else []),
                    default=dtype_default, help="dtype of the written tensors")
    sp.add_argument("--force", action="store_true", help="replace an existing output file (never an input)")


def cmd_resize(args: argparse.Namespace) -> int:
    from .resize import resize
    r = resize(args.file, args.out, rank=args.rank, conv_rank=args.conv_rank, method=args.dynamic_method,
               param=args.dynamic_param, min_norm=args.min_norm, base=args.base, family=args.family,
               dtype=_dtype(args.dtype), force=args.force, device=args.device, per_layer=not args.quiet)
    print(f"wrote {r.path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge
    r = merge(args.loras, args.out, rank=args.rank, conv_rank=args.conv_rank, method=args.dynamic_method,
              param=args.dynamic_param, min_norm=args.min_norm, base=args.base, family=args.family,
              dtype=_dtype(args.dtype), force=args.force, device=args.device, per_layer=args.verbose)
    print(f"wrote {r.path}")
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    from .bake import bake
    bake(args.base, args.loras, args.out, force=args.force)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract
    r = extract(args.base, args.tuned, args.out, rank=args.rank, conv_rank=args.conv_rank,
                method=args.dynamic_method, param=args.dynamic_param, clamp=args.clamp_quantile,
                min_diff=args.min_diff, dtype=_dtype(args.dtype), force=args.force, device=args.device,
                per_layer=args.verbose)
    print(f"wrote {r.path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    convert(args.file, args.out, to=args.to, unet_names=args.unet_names, dtype=_dtype(args.dtype),
            family=args.family, force=args.force)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fam = dict(choices=list(UNET_FAMILIES), default=None,
               help="model family, when the file does not say (its keys and metadata decide otherwise)")

    sp = sub.add_parser("resize", formatter_class=_FMT, help="lower a LoRA's rank by SVD (any algorithm in, LoRA out)",
                        description="Lower a LoRA's rank by SVD of its exact per-layer delta. Any algorithm can "
                                    "be input; DoRA, OFT/BOFT and IA3 need --base. Output: kohya LoRA/LoCon.")
    sp.add_argument("file")
    sp.add_argument("--out", required=True, help="output .safetensors")
    _rank_options(sp, 32, "the new rank (with --dynamic-method: the largest allowed)")
    _delta_options(sp, fam)
    sp.add_argument("--quiet", action="store_true", help="only the overall energy kept, not each layer")
    _common(sp, "fp16")
    sp.set_defaults(func=cmd_resize)

    sp = sub.add_parser("merge", formatter_class=_FMT, help="combine LoRAs with weights into one LoRA",
                        description="Combine LoRAs into one: exactly (ranks side by side) without --rank, "
                                    "or the best approximation of --rank by SVD. Inputs: " + _SPEC)
    sp.add_argument("loras", nargs="+", metavar="LORA")
    sp.add_argument("--out", required=True, help="output .safetensors")
    _rank_options(sp, None, "SVD to this rank (default: exact merge)")
    _delta_options(sp, fam)
    sp.add_argument("--verbose", action="store_true", help="print the energy kept per layer")
    _common(sp, "fp16")
    sp.set_defaults(func=cmd_merge)

    sp = sub.add_parser("bake", formatter_class=_FMT, help="merge LoRAs into a checkpoint (single-file safetensors)",
                        description="Merge LoRAs with weights into a checkpoint, one tensor at a time. The output "
                                    "has the input's keys and dtypes. LoRAs: " + _SPEC)
    sp.add_argument("base", help="single-file checkpoint (.safetensors; a .ckpt is read whole)")
    sp.add_argument("loras", nargs="+", metavar="LORA")
    sp.add_argument("--out", required=True, help="output .safetensors")
    sp.add_argument("--force", action="store_true", help="replace an existing output file (never an input)")
    sp.set_defaults(func=cmd_bake)

    sp = sub.add_parser("extract", formatter_class=_FMT, help="a LoRA from a base and a fine-tuned checkpoint",
                        description="Build a LoRA (LoCon with --conv-rank) from the difference of two checkpoints "
                                    "of one family, as kohya's extract_lora_from_models does.")
    sp.add_argument("base")
    sp.add_argument("tuned")
    sp.add_argument("--out", required=True, help="output .safetensors")
    _rank_options(sp, 4, "rank (with --dynamic-method: the largest allowed)")
    sp.description += " Convs (resnets, samplers) only with --conv-rank."
    sp.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp factors to this quantile (1: off)")
    sp.add_argument("--min-diff", type=float, default=0.01,
                    help="leave the text encoder out when no weight of it changed by more than this")
    sp.add_argument("--verbose", action="store_true", help="print the energy kept per layer")
    _common(sp, "fp16")
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("convert", formatter_class=_FMT, help="kohya <-> diffusers/PEFT keys, SDXL UNet spellings, dtype",
                        description="Rewrite a LoRA's keys: kohya or diffusers/PEFT (alphas in lora_adapter_metadata, "
                                    "as diffusers' load_lora_weights reads them); SDXL UNet keys the SGM or diffusers "
                                    "way; and/or its dtype. Metadata is carried over.")
    sp.add_argument("file")
    sp.add_argument("--out", required=True, help="output .safetensors")
    sp.add_argument("--to", choices=["kohya", "diffusers"], default="kohya", help="key format")
    sp.add_argument("--unet-names", choices=["sgm", "diffusers"], default=None,
                    help="SDXL kohya UNet spelling (default: sgm, kohya's own)")
    sp.add_argument("--family", **fam)
    _common(sp, "keep")
    sp.set_defaults(func=cmd_convert)
