"""``python -m lib_lora <command>``: the headless entry point."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import families
from .bundled import SDXL_PARTS
from .fileio import LoraFileError
from .hashes import file_hashes
from .network import load_network
from .metadata import tag_frequency
from .training.options import OptionError

_SUMMARY_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module",
                 "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_num_train_images",
                 "ss_max_train_steps", "ss_num_epochs", "ss_learning_rate", "ss_training_comment", "ss_pivotal_word",
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
        # bundled textual inversions: name -> vectors, and the width per text encoder ("" for SD1/SD2)
        "embeddings": {name: {"vectors": e.count, "widths": {p: int(e.vectors[p].shape[1])
                                                             for p in ("", *SDXL_PARTS) if p in e.vectors}}
                       for name, e in net.embeddings.items()},
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
    for name, e in info["embeddings"].items():
        widths = " + ".join(f"{p} {w}" if p else str(w) for p, w in e["widths"].items())
        print(f"embedding   {name}: {e['vectors']} vectors, {widths} wide (bundled)")
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


def _flag(option: str) -> str:
    """How the ``train`` command spells an option named in an OptionError or RequestError."""
    from .training.cli_args import kohya_flag
    from .training.options import by_name
    special = {"output_name": "--out", "out": "--out", "dataset": "DATASET", "train_dir": "DATASET"}
    if option in special:
        return special[option]
    o = by_name(option)
    if o is not None and o.flag and o.flag.startswith("--"):
        return o.flag
    if o is not None and kohya_flag(o):
        return f"--{o.kohya}"
    if o is not None and o.kohya_note == "optimizer_args":
        return "--optimizer_args"
    return f"--{option}"  # network_args, optimizer_args: kohya's spelling


def _train_request(args: argparse.Namespace):
    """The command line as a request, validated by the same ``build_request`` as the tab and the API."""
    from .training.cli_args import train_data
    from .training.request import build_request

    data, folder = train_data(args)
    return build_request(data, folder, presets=False)


def _train_config(args: argparse.Namespace):
    return _train_request(args).config


def _load(path: str, console, **kw):
    """The checkpoint, with a progress line while it loads."""
    from .hosts.cli.checkpoint import load_checkpoint
    from .hosts.cli.console import Timer
    with Timer(console, f"loading {Path(path).name}") as t:
        return load_checkpoint(path, progress=t.stage, **kw)


def _sample_warnings(cfg) -> list[str]:
    """Sample settings that would do nothing, said instead of silently ignored."""
    scheduled = cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first
    if cfg.sample_prompts and not scheduled:
        return ["--sample_prompts is given without --sample_every_n_steps, --sample_every_n_epochs or "
                "--sample_at_first: no samples will be rendered"]
    if scheduled and not cfg.sample_prompts:
        return ["sampling is scheduled but --sample_prompts names no prompts: no samples will be rendered"]
    return []


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .hosts.cli.attention import sdpa_attention
    from .hosts.cli.console import Console, Timer
    from .hosts.cli.samples import TrainingSamples, sampler_for
    from .hosts.cli.signals import StopOnSignal
    from .training import sample_prompts
    from .training.checks import clip_skip_for
    from .training.cli_args import noted_lines
    from .training.plan import make_plan
    from .training.trainer import Callbacks, Trainer

    cfg = _train_config(args)
    for line in cfg.sample_prompts:  # a sampler this host cannot render is refused before anything is read
        sampler_for(sample_prompts.parse(line, 64, 64, 0).sampler or cfg.sample_sampler)
    console = Console()
    plan = make_plan(cfg, args.resume, log=console.log)  # the dataset and the output names, before the model is read
    console.enabled = plan.is_main
    for warning in _sample_warnings(cfg):
        console.log(f"warning: {warning}")
    for line in noted_lines(args):  # kohya's options that set nothing here, answered
        console.log(f"note: {line}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = _load(args.base, console, device=device,
                 dtype=torch.float16 if device != "cpu" and cfg.mixed_precision == "fp16" else torch.float32)
    skip, note = clip_skip_for(ckpt.family, plan.config.clip_skip)
    if note:
        console.log(f"warning: {note}")
    with Timer(console, f"hashing {Path(args.base).name}"):  # for the metadata; seconds for a large file
        model = ckpt.trainable(clip_skip=skip, max_token_length=plan.config.max_token_length)
    model.context = lambda: sdpa_attention(ckpt.unet)
    samples = TrainingSamples(ckpt, plan.config, plan.dataset.steps_per_epoch(plan.global_batch), console.log)
    model.render = samples.render
    trainer = Trainer(model, plan, Callbacks(on_progress=console.steps, on_samples=samples.save,
                                             on_caching=console.stage, log=console.log))
    summary = plan.summary
    console.log(f"dataset: {summary['train_images']} images, {summary['steps_per_epoch']} steps/epoch, "
                f"{plan.total_steps} steps, processes {plan.world}")
    with StopOnSignal(trainer, console.log) as stop:
        res = trainer.run()
    console.end()
    if stop.received is not None and res.stopped:
        import signal

        from .training.state import state_path
        state = state_path(res.output) if res.output else None
        what = (f"saved {res.output}" + (f"; resume with --resume {state}" if state.is_file() else "")) \
            if res.output else "nothing saved"
        if plan.is_main:
            print(f"interrupted by {signal.Signals(stop.received).name} at step {res.steps} of {plan.total_steps}: "
                  f"{what}", file=sys.stderr)
        return stop.exit_code
    if plan.is_main:
        print(f"wrote {res.output}" if res.output else "stopped without saving")
    return 0


def cmd_output_config(args: argparse.Namespace) -> int:
    """kohya's --output_config: write the command line to --config_file, and train nothing."""
    from .training.cli_args import write_output_config
    print(f"wrote {write_output_config(args)}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .hosts.cli.conditioning import embeddings_used
    from .hosts.cli.console import Console
    from .hosts.cli.samples import DISPLAY
    from .hosts.cli.sampling import sample
    from .infotext import KEY as LORA_HASHES, format_hashes, format_parameters, save_png
    from .library import Library
    from .params import parse_prompt
    from .runtime import Runtime

    console = Console()
    ckpt = _load(args.base, console)
    bad_tokens: list[str] = []
    prompt, requests = parse_prompt(args.prompt, errors=bad_tokens)
    rt = Runtime(Library(args.lora_dir or [Path(".")]))
    from .modelmap import ModelMap
    rt.set_model(ModelMap.build(ckpt.family, ckpt.unet, ckpt.text_encoders))
    res = rt.activate(requests)
    ckpt.embeddings, skipped = ckpt.embeddings_for(res.embeddings)   # the prompt's names become their vectors
    # the WebUI's TI hashes for a bundled embedding: its name and its LoRA's, for those the prompt names
    lora_of = {id(e): lora for lora, e in reversed(res.embeddings)}
    ti_hashes = ", ".join(f"{e.name}: {lora_of[id(e)]}"
                          for e in embeddings_used(ckpt.config["text_encoders"], [prompt], ckpt.embeddings))
    for m in bad_tokens + res.messages + skipped:
        console.log(f"warning: {m}")
    width, height = args.width or ckpt.resolution, args.height or ckpt.resolution
    try:
        def progress(done: int, total: int) -> None:
            console.line(f"rendering {args.n} image{'s' if args.n > 1 else ''}: step {done}/{total}", done=done == total)

        images = sample(ckpt, [prompt] * args.n, negative=args.negative, steps=args.steps, cfg=args.cfg,
                        seed=args.seed, width=width, height=height, sampler=args.sampler, progress=progress)
    finally:
        rt.restore()
        ckpt.embeddings = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        # the WebUI's infotext, with the prompt as written (<lora:...> tokens included)
        text = format_parameters(args.prompt, args.negative, {
            "Steps": args.steps, "Sampler": DISPLAY[args.sampler], "CFG scale": args.cfg, "Seed": args.seed + i,
            "Size": f"{width}x{height}", "Model hash": ckpt.hashes()["sha256"][:10] or None, "Model": ckpt.name,
            "TI hashes": ti_hashes or None, LORA_HASHES: format_hashes(res.hashes) or None})
        if path.suffix.lower() == ".png":
            save_png(img, path, text)
        else:  # another format keeps the image only
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
    sp.add_argument("--family", choices=families.UNET_FAMILIES, default="sd1")  # the layouts architectures.py builds
    sp.add_argument("--rank", type=int, default=4)
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(func=cmd_sample)

    from .training.cli_args import add_train_arguments
    sp = sub.add_parser("train", allow_abbrev=False,
                        help="train a LoRA on a single-file SD1/SD2/SDXL checkpoint (kohya-style folders)",
                        description="Train a LoRA.  Every option also takes its sd-scripts spelling "
                                    "(--train_batch_size, --network_args conv_dim=8 ...), with _ or -.")
    add_train_arguments(sp)
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


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand ``args`` ran (the top level when there is none)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices.get(getattr(args, "command", None), parser)


def main(argv: list[str] | None = None) -> int:
    from .hosts.cli.config import ArchitectureError
    from .adapters import AdapterError
    from .tools.common import ToolError
    from .training.problems import DatasetError
    from .training.errors import RequestError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "func", None) is cmd_train and (args.config_file or args.output_config):
        from .training.cli_args import with_config_file
        try:
            if args.output_config:
                args.func = cmd_output_config
            else:  # kohya's --config_file: its values, then the command line over them
                args, extra = with_config_file(_subparser(parser, args), argv, args)
        except RequestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if extra:
        # an unknown option is the subcommand's error: show its usage, not the top level's
        hint = " (an sd-scripts option this trainer does not have is refused, never ignored)" \
            if getattr(args, "func", None) is cmd_train and any(x.startswith("--") for x in extra) else ""
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    try:
        return args.func(args)
    except (OptionError, RequestError) as e:
        print(f"error: {_flag(e.option)}: {e.detail}" if e.option else f"error: {e}", file=sys.stderr)
        return 2
    except (LoraFileError, FileExistsError, FileNotFoundError, IsADirectoryError, PermissionError,
            DatasetError, ArchitectureError, ToolError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (while a checkpoint loads...)
        print("\ninterrupted", file=sys.stderr)
        return 130
