"""``python -m lib_lora demo``: teach the toy base model a shape it never saw, measurably.

1. writes two kohya datasets: the concept "star" under trigger ``zkx`` and the style "diagonal"
   background under trigger ``qwv`` (``write_kohya_dataset``);
2. trains a LoRA on each with the project's ``Trainer`` (the same code path as ``python -m lib_lora train``);
3. applies the saved files through ``Runtime`` / ``Patcher`` as the WebUI does for ``<lora:name:w>`` and
   renders ``grid.png``: base | <lora:zkx_star:0.5> | <lora:zkx_star:1> | star + diagonal style;
4. scores generations with the toy-world scorer (concept acquisition at weights 0 / 0.5 / 1, base-world
   accuracy with and without the LoRA, the style and the combination), draws ``loss.png`` and writes
   ``summary.json``.

The base is ``toyworld/assets/toy-sd1.safetensors`` (see ``base_model.py``).  When that file is
missing, a base is trained on the spot with the recipe at a tiny budget; it is then labelled
``FALLBACK`` everywhere, and its numbers mean little.

Both LoRAs are trained with the "toy" preset (training/presets.py ``PRESETS``), each with its trigger as the
pivotal word (its embeddings trained too and bundled in the file), through the same request path as the tab and
the API.  What it measures with the committed base, and how that compares with
kohya's settings, is in the README ("The toy world demo").  quick=True runs in well under a minute.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw

from . import measure
from .measure import LoraRenderer
from .world import CONCEPTS, generate, write_kohya_dataset

CONCEPT_LORA, STYLE_LORA = "zkx_star", "qwv_diagonal"


@dataclass(frozen=True)
class DemoSettings:
    images: int            # training images per dataset
    repeats: int
    steps: int | None      # LoRA optimiser steps per LoRA (None: the toy preset's)
    train: dict[str, Any]  # request keys over the "toy" preset (training/presets.py PRESETS)
    eval_n: int            # prompts per measured setting
    sample_steps: int
    cfg: float
    grid_rows: int


# The toy preset as it ships: a UNet-only LoCon (shapes live in the resnet convs; attention-only LoRAs
# barely draw one), the text encoder frozen (training it forgets more and acquires no faster).
FULL = DemoSettings(images=60, repeats=1, steps=None, train={}, eval_n=30, sample_steps=20, cfg=5.0, grid_rows=4)
QUICK = DemoSettings(images=12, repeats=1, steps=10, eval_n=4, sample_steps=6, cfg=5.0, grid_rows=2,
                     train={"batch_size": 4, "network": {"rank": 4, "alpha": 4, "conv_rank": 4, "conv_alpha": 4}})
# Tiny-budget recipe used when no trained base exists (labelled FALLBACK).
FALLBACK_RECIPE = dict(vae_images=128, unet_images=256, vae_eval_images=16, eval_prompts=0, unet_steps=0,
                       unet_batch=32)


class _Bar:
    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream = label, stream

    def __call__(self, p) -> None:
        width = 30
        done = int(width * p.step / max(p.total, 1))
        self.stream.write(f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {p.step}/{p.total} "
                          f"loss {p.avg_loss:.4f} eta {p.eta:4.0f}s ")
        if p.step >= p.total:
            self.stream.write("\n")
        self.stream.flush()


def _base(out_dir: Path, base: Path | None, quick: bool, log: Callable[[str], None]):
    from ..hosts.cli.checkpoint import load_checkpoint
    from .base_model import DEFAULT_PATH, run as run_recipe

    path = Path(base) if base is not None else DEFAULT_PATH
    if path.is_file():
        return load_checkpoint(path), {"path": str(path), "fallback": False}
    log(f"FALLBACK: no trained base at {path}; training one from the recipe with a tiny budget "
        "(results will be poor and are labelled FALLBACK)")
    minutes = 0.15 if quick else 2.0
    rec = run_recipe(out_dir / "fallback-base", minutes, FALLBACK_RECIPE, name="toy-sd1-fallback")
    p = out_dir / "fallback-base" / "toy-sd1-fallback.safetensors"
    return load_checkpoint(p), {"path": str(p), "fallback": True, "recipe_minutes": minutes,
                                "recipe_total_minutes": rec["total_minutes"]}


def _train(ck, data_root: Path, out: Path, name: str, s: DemoSettings, seed: int,
           trigger: str) -> tuple[Path, list[float], float]:
    """One LoRA with the "toy" preset and its trigger as the pivotal word, through the same request path as the
    tab and the API."""
    from ..hosts.cli.attention import sdpa_attention
    from ..training.plan import make_plan
    from ..training.request import build_request
    from ..training.trainer import Callbacks, Trainer

    req: dict[str, Any] = {"preset": "toy", "dataset": {"train_dir": str(data_root)}, "output_name": name,
                           "overwrite": True, "seed": seed, "training_comment": "lib_lora toyworld demo",
                           "pivotal_word": trigger, **s.train}
    if s.steps is not None:
        req["max_train_steps"] = s.steps
    cfg = build_request(req, out, family=ck.family).config
    model = ck.trainable()
    model.context = lambda: sdpa_attention(ck.unet)
    t0 = time.time()
    res = Trainer(model, make_plan(cfg, log=lambda m: None),
                  Callbacks(on_progress=_Bar(f"train {name:13s}"), log=lambda m: None)).run()
    return res.output, list(res.losses), time.time() - t0


def _label(im: Image.Image, text: str, width: int) -> Image.Image:
    canvas = Image.new("RGB", (width, 14), (255, 255, 255))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0))
    return canvas


def _grid(rows: list[list[Image.Image]], headers: list[str], title: str, cell: int = 160) -> Image.Image:
    cols = len(headers)
    top = 30
    g = Image.new("RGB", (cols * cell, top + len(rows) * cell), (255, 255, 255))
    d = ImageDraw.Draw(g)
    d.text((4, 2), title, fill=(0, 0, 0))
    for c, h in enumerate(headers):
        d.text((c * cell + 4, 16), h, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            g.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, top + r * cell))
    return g


def _loss_plot(curves: dict[str, list[float]], title: str, size=(640, 360)) -> Image.Image:
    w, h = size
    pad = 40
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.text((pad, 8), title, fill=(0, 0, 0))
    smooth = {}
    for k, v in curves.items():
        if not v:
            continue
        win = max(1, len(v) // 20)
        smooth[k] = [sum(v[max(0, i - win + 1):i + 1]) / len(v[max(0, i - win + 1):i + 1]) for i in range(len(v))]
    vals = [x for v in smooth.values() for x in v] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1e-6
    n = max((len(v) for v in smooth.values()), default=1)
    d.rectangle((pad, pad, w - pad, h - pad), outline=(0, 0, 0))
    d.text((4, pad - 6), f"{hi:.3f}", fill=(0, 0, 0))
    d.text((4, h - pad - 6), f"{lo:.3f}", fill=(0, 0, 0))
    d.text((w - pad - 40, h - pad + 6), f"step {n}", fill=(0, 0, 0))
    colours = [(200, 40, 40), (40, 70, 220), (40, 160, 60)]
    for j, (k, v) in enumerate(smooth.items()):
        pts = [(pad + (w - 2 * pad) * i / max(n - 1, 1), h - pad - (h - 2 * pad) * (x - lo) / (hi - lo))
               for i, x in enumerate(v)]
        if len(pts) > 1:
            d.line(pts, fill=colours[j % 3], width=2)
        d.text((w - pad - 150, pad + 6 + 14 * j), f"{k} (smoothed)", fill=colours[j % 3])
    return im


def run_demo(out_dir: Path, quick: bool = False, base: Path | None = None, seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """Run the whole demo into ``out_dir``; returns (and writes) the summary."""
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    t_start = time.time()
    s = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ck, base_info = _base(out_dir, base, quick, log)
    tag = "FALLBACK base (tiny-budget recipe) - " if base_info["fallback"] else ""
    log(f"{tag}base {base_info['path']}")

    star, diag = CONCEPTS["star"], CONCEPTS["diagonal"]
    data = out_dir / "data"
    lora_dir = out_dir / "loras"
    for sub in (data, lora_dir):
        if sub.exists():
            shutil.rmtree(sub)
    write_kohya_dataset(data / "star", star, s.images, s.repeats, seed)
    write_kohya_dataset(data / "diagonal", diag, s.images, s.repeats, seed + 1)

    concept_path, concept_losses, concept_s = _train(ck, data / "star", lora_dir, CONCEPT_LORA, s, seed + 2,
                                                        CONCEPTS["star"].trigger)
    style_path, style_losses, style_s = _train(ck, data / "diagonal", lora_dir, STYLE_LORA, s, seed + 3,
                                                  CONCEPTS["diagonal"].trigger)

    render = LoraRenderer(ck, [lora_dir], s.sample_steps, s.cfg)
    try:
        # held-out prompts (seeds differ from the training sets')
        n, cl, sl = s.eval_n, CONCEPT_LORA, STYLE_LORA
        scores: dict[str, Any] = {"n_prompts": n}
        scores["concept_star_rate"] = measure.acquisition(render, cl, star, (0, 0.5, 1), n, seed + 100)
        scores["base_world_shape_colour"] = {
            "no_lora": measure.base_accuracy(render, (), n, seed + 102),
            f"{cl}:1": measure.base_accuracy(render, [(cl, 1)], n, seed + 102)}
        scores["style_diagonal_rate"] = measure.acquisition(render, sl, diag, (0, 1), n, seed + 101)
        scores["combined_star_and_diagonal_rate"] = measure.composition(render, (cl, star), (sl, diag), n, seed + 103)

        # the grid: one row per prompt, the same noise across a row
        rows = []
        star_prompts, _ = measure.concept_prompts(star, s.grid_rows, seed + 100)
        # the same scenes with the style's background: "a red zkx on a qwv background"
        combo_prompts = [c for _, c, _ in generate(s.grid_rows, seed + 100, star.world, {**star.words, **diag.words},
                                                   backgrounds=(diag.value,))]
        for r in range(s.grid_rows):
            p = star_prompts[r]
            q = combo_prompts[r]
            cells = render([p, p + f" <lora:{cl}:0.5>", p + f" <lora:{cl}:1>",
                            q + f" <lora:{cl}:1> <lora:{sl}:1>"], [seed + 600 + r] * 4)
            rows.append(cells)
        headers = ["base (w=0)", f"{cl}:0.5", f"{cl}:1", f"{cl}:1+{sl}:1"]
        title = (f"{tag}prompts like '{star_prompts[0]}'"
                 + (" (last column: '... qwv background')"))
        _grid(rows, headers, title).save(out_dir / "grid.png")
        messages = sorted(set(render.messages))
    finally:
        render.close()

    _loss_plot({CONCEPT_LORA: concept_losses, STYLE_LORA: style_losses},
               f"{tag}LoRA training loss ({len(concept_losses)} steps each)").save(out_dir / "loss.png")
    summary = {
        "label": "FALLBACK" if base_info["fallback"] else "trained base",
        "quick": quick, "base": base_info, "settings": {**s.__dict__, "preset": "toy"},
        "loras": {name: {"path": str(path), "seconds": round(secs, 1), "loss_first10": _mean(losses[:10]),
                         "loss_last10": _mean(losses[-10:])}
                  for name, path, secs, losses in ((CONCEPT_LORA, concept_path, concept_s, concept_losses),
                                                   (STYLE_LORA, style_path, style_s, style_losses))},
        "scores": scores, "runtime_messages": messages,
        "outputs": {k: str(out_dir / f) for k, f in (("grid", "grid.png"), ("loss", "loss.png"),
                                                     ("summary", "summary.json"))},
        "seconds": round(time.time() - t_start, 1),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    _report(summary, log)
    return summary


def _mean(v: list[float]) -> float | None:
    return round(sum(v) / len(v), 5) if v else None


def _report(summary: dict, log: Callable[[str], None]) -> None:
    sc = summary["scores"]
    tag = "[FALLBACK base] " if summary["base"]["fallback"] else ""
    log(f"{tag}scorer, {sc['n_prompts']} prompts per setting:")
    log(f"  concept 'zkx' drawn as a star   w=0: {sc['concept_star_rate']['0']:.0%}  "
        f"w=0.5: {sc['concept_star_rate']['0.5']:.0%}  w=1: {sc['concept_star_rate']['1']:.0%}")
    b = sc["base_world_shape_colour"]
    log(f"  base world shape+colour right   no LoRA: {b['no_lora']:.0%}  with {CONCEPT_LORA}:1: "
        f"{b[CONCEPT_LORA + ':1']:.0%}")
    st = sc["style_diagonal_rate"]
    log(f"  style 'qwv' as diagonal stripes w=0: {st['0']:.0%}  w=1: {st['1']:.0%}")
    log(f"  star + diagonal combined        {sc['combined_star_and_diagonal_rate']:.0%}")
    log(f"wrote {', '.join(summary['outputs'].values())} in {summary['seconds']:.0f}s")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``demo`` sub-command for ``lib_lora.cli.build_parser``."""
    sp = subparsers.add_parser("demo", help="train LoRAs on the toy world (a new shape and a new style) and "
                                            "measure them with the toy-world scorer")
    sp.add_argument("--out", type=Path, default=Path("toyworld-demo"), help="output folder")
    sp.add_argument("--quick", action="store_true", help="reduced setting (< 1 minute, for CI)")
    sp.add_argument("--base", type=Path, help="base checkpoint (default: the bundled toy-sd1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_demo)
    return sp


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, quick=args.quick, base=args.base, seed=args.seed)
    return 0
