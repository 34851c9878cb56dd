"""What a LoRA learns and what it breaks, on the toy world (CPU, minutes).

    .venv/bin/python benchmarks/concept.py --compare-defaults    # our "toy" preset vs kohya's settings, 3 seeds
    .venv/bin/python benchmarks/concept.py --variant snr5:min_snr_gamma=5 --seeds 0 1 2   # a lever vs the baseline
    .venv/bin/python benchmarks/concept.py --variant reg:preset=toy,reg=base,prior_loss_weight=1.0   # + base-model reg images
    .venv/bin/python benchmarks/concept.py --ranks 16 --kinds locon  # our trainer at kohya's settings, by rank
    .venv/bin/python benchmarks/concept.py --write-dataset DIR   # the datasets, for another trainer
    .venv/bin/python benchmarks/concept.py --lora A.safetensors --lora B.safetensors   # any kohya-format files

The concept is the toy world's "star" (trigger ``zkx``), never seen by the base model; the style for
the composition row is the "diagonal" background (trigger ``qwv``), trained once with the demo's
settings unless ``--style FILE`` is given.  The baseline, ``KOHYA``, is our trainer at sd-scripts'
settings (UNet-only LoCon rank 16 / conv 16, alpha = rank, AdamW at lr 1e-3 constant, no min-SNR), 500
steps of batch 8 on 60 training images at 64 px; ``--variant`` trains overrides of it in the same run
(``preset=toy`` overrides the toy preset instead; ``reg=base`` adds DreamBooth-style prior preservation:
``--reg-images`` base-world prompts drawn by the base model itself at the scorer's 20 steps / CFG 5,
captioned with their prompts, as a kohya ``1_shape`` regularisation folder, made once per seed; weigh
them with ``prior_loss_weight``; ``reg=base:cross+diamond`` draws prompts of only those shapes; a key
``opt.NAME=VALUE`` goes to ``optimizer_args``, e.g. ``optimizer=Prodigy,learning_rate=1.0,opt.d_coef=2``;
any trainer option by its request key, e.g. pivotal tuning:
``pivotal_word=zkx,pivotal_lr=5e-3,pivotal_steps=150``).  Files are applied through the same Runtime as
``<lora:name:w>`` in a WebUI prompt, so files written by kohya's sd-scripts, ComfyUI trainers or
anything else that writes kohya keys are scored the same way as ours (train them on the folders
``--write-dataset`` writes, against ``lib_lora/toyworld/assets/toy-sd1.safetensors``).

Columns (fractions of a fixed prompt/seed set, read by ``toyworld.scorer``):
  acq@0/0.5/1   trigger prompts drawn as the concept with the LoRA at that weight
  base / base+L base-world prompts drawn in the prompted shape and colour, without / with the LoRA at 1
  compose       concept + style LoRAs at 1, both triggers: images showing both
  80% step/s    first saved step (and training seconds) whose file reaches 80% acquisition at weight 1
                (checked every --eval-every steps on --probe prompts; "-" if never); for --lora files,
                "(N)" is the step count the file's ss_steps metadata records
  train s       training seconds of the whole run (same process, same core for every row); drawing the
                reg images (once per seed, shared by every reg=base row) is printed after the row
  curve         step:acquisition at weight 1 of every saved file, on --probe prompts
  MB            file size
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib_lora.toyworld import measure  # noqa: E402
from lib_lora.toyworld.world import CONCEPTS, write_kohya_dataset  # noqa: E402

STAR, DIAGONAL = CONCEPTS["star"], CONCEPTS["diagonal"]


def write_datasets(root: Path, images: int, seed: int = 0) -> dict[str, Path]:
    """kohya folders for the concept and the style (``root/star/1_zkx``, ``root/diagonal/1_qwv``)."""
    write_kohya_dataset(root / "star", STAR, images, 1, seed)
    write_kohya_dataset(root / "diagonal", DIAGONAL, images, 1, seed + 1)
    return {"star": root / "star", "diagonal": root / "diagonal"}


# Our kohya-equivalent settings: what sd-scripts' train_network.py does with --network_module networks.lora
# --network_dim 16 --network_alpha 16 --network_args conv_dim=16 conv_alpha=16 --network_train_unet_only
# --learning_rate 1e-3 --lr_scheduler constant --optimizer_type AdamW --train_batch_size 8 (no min-SNR).
KOHYA: dict[str, object] = {"network.rank": 16, "network.alpha": 16.0, "network.conv_rank": 16,
                            "network.conv_alpha": 16.0, "network.train_text_encoder": False, "learning_rate": 1e-3,
                            "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "AdamW",
                            "min_snr_gamma": None}


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """ "label:key=value,key=value" -> (label, overrides of KOHYA); values are Python literals or strings.
    Two keys are the benchmark's, not the trainer's: ``preset`` (override that preset, not KOHYA) and
    ``reg`` ("base": train with regularisation images drawn by the base model, ``write_base_reg``;
    "base:cross+diamond": of only those shapes).  ``opt.NAME`` keys are gathered into ``optimizer_args``
    (a dict literal cannot be written here, as commas separate the keys)."""
    import ast

    label, _, body = text.partition(":")
    out: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    opt = {k[4:]: out.pop(k) for k in [k for k in out if k.startswith("opt.")]}
    if opt:
        out["optimizer_args"] = {**dict(out.get("optimizer_args") or {}), **opt}
    return label, out


def reg_shapes(reg: str) -> tuple[str, ...] | None:
    """The shapes a ``reg=`` value names ("base" -> None: every base-world shape)."""
    from lib_lora.toyworld.world import BASE_WORLD

    kind, _, names = reg.partition(":")
    shapes = tuple(filter(None, names.split("+")))
    if kind != "base" or set(shapes) - set(BASE_WORLD.shapes):
        raise SystemExit(f"--variant reg={reg}: expected 'base' or 'base:SHAPE+SHAPE' with base-world shapes "
                         f"{list(BASE_WORLD.shapes)}")
    return shapes or None


def write_base_reg(ck, root: Path, n: int, seed: int, batch: int = 32,
                   shapes: tuple[str, ...] | None = None) -> Path:
    """``root/1_shape``: ``n`` base-world prompts (of ``shapes`` only, if given) drawn by the base model
    ``ck`` (the scorer's sampler settings), each captioned with its prompt: regularisation images for
    prior preservation."""
    from lib_lora.hosts.cli.attention import sdpa_attention
    from lib_lora.hosts.cli.sampling import sample
    from lib_lora.toyworld.world import BASE_WORLD, generate

    folder = root / "1_shape"   # captions come from the .txt files; the folder's class word is a fallback
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [c for _, c, _ in generate(n, seed, BASE_WORLD, shapes=shapes)]
    with sdpa_attention(ck.unet):
        for j in range(0, n, batch):
            chunk = prompts[j:j + batch]
            for i, im in enumerate(sample(ck, chunk, steps=20, cfg=5.0, seed=seed + 5000 + j, width=64, height=64)):
                im.save(folder / f"reg_{j + i}.png")
                (folder / f"reg_{j + i}.txt").write_text(chunk[i], encoding="utf-8")
    return root


def train(ck, data: Path, out: Path, name: str, settings: dict[str, object], steps: int, every: int,
          batch: int, seed: int, reg_dir: Path | None = None) -> tuple[Path, dict[int, float]]:
    """Our Trainer (the WebUI tab's and the CLI's code path) with request-key ``settings``; returns the
    file and step -> training seconds.  ``reg_dir``: a kohya regularisation folder, shuffled into the
    same batches (kohya's balancing: as many reg samples per epoch as training samples)."""
    from lib_lora.hosts.cli.attention import sdpa_attention
    from lib_lora.training.dataset import DatasetConfig
    from lib_lora.training.network import NetworkConfig
    from lib_lora.training.config import TrainConfig
    from lib_lora.training.plan import make_plan
    from lib_lora.training.trainer import Callbacks, Trainer

    net = {k.partition(".")[2]: v for k, v in settings.items() if k.startswith("network.")}
    top = {k: v for k, v in settings.items() if "." not in k and k not in ("reg", "preset")}
    top = {"max_train_steps": steps, "batch_size": batch, **top}   # a variant may set its own steps and batch
    if every and top["max_train_steps"] != steps:    # probe the same fractions of the run
        every = every * top["max_train_steps"] // steps
    cfg = TrainConfig(DatasetConfig(data, resolution=64, enable_buckets=False, reg_dir=reg_dir), NetworkConfig(**net),
                      output_dir=out, output_name=name, overwrite=True, seed=seed, save_every_n_steps=every, **top)
    model = ck.trainable()
    model.context = lambda: sdpa_attention(ck.unet)
    clock: dict[int, float] = {}

    def progress(p) -> None:
        clock[p.step] = p.elapsed

    res = Trainer(model, make_plan(cfg, log=lambda m: None), Callbacks(on_progress=progress, log=lambda m: None)).run()
    return res.output, clock


def score_file(render: measure.LoraRenderer, name: str, n: int, seed: int, style: str | None) -> dict:
    row = {"acq": measure.acquisition(render, name, STAR, (0, 0.5, 1), n, seed + 100),
           "base_with": measure.base_accuracy(render, [(name, 1)], n, seed + 102)}
    if style:
        row["compose"] = measure.composition(render, (name, STAR), (style, DIAGONAL), n, seed + 103)
    return row


def curve(render: measure.LoraRenderer, stems: list[tuple[int, str]], probe: int, seed: int) -> dict[int, float]:
    """Step -> acquisition at weight 1 (on ``probe`` prompts) of each intermediate file and the last."""
    return {step: measure.acquisition(render, stem, STAR, (1,), probe, seed + 100)["1"] for step, stem in stems}


def first_reaching(points: dict[int, float], level: float = 0.8) -> int | None:
    """The first step whose file reaches ``level`` acquisition at weight 1 (None: none does)."""
    return next((step for step, got in sorted(points.items()) if got >= level), None)


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def preset_settings(name: str = "toy") -> dict[str, object]:
    """A preset (training/presets.py PRESETS) as request-key settings for ``train``: what the demo and the
    tab's "toy" preset train with."""
    from lib_lora.training.presets import PRESETS

    p = PRESETS[name]
    skip = {"dataset", "network", "seed", "mixed_precision", "max_train_epochs", "save_every_n_epochs"}
    return {**{f"network.{k}": v for k, v in p["network"].items()}, **{k: v for k, v in p.items() if k not in skip}}


def _jobs(a: argparse.Namespace) -> list[tuple[str, dict[str, object]]]:
    """(label, request-key settings) per LoRA to train: the kohya-equivalent baseline and --variant
    overrides of it, or the --kinds x --ranks sweep."""
    if a.compare_defaults:
        # the demo's settings: the toy preset with the trigger as pivotal word
        return [("kohya", dict(KOHYA)), ("ours (toy)", {**preset_settings("toy"), "pivotal_word": STAR.trigger})]
    if a.variant:
        return [("kohya", dict(KOHYA))] * (not a.no_baseline) + [
            (lab, {**(preset_settings(str(ov["preset"])) if "preset" in ov else KOHYA), **ov})
            for lab, ov in map(parse_variant, a.variant)]
    common = {**KOHYA, "learning_rate": a.lr, "network.train_text_encoder": a.text_encoder,
              "min_snr_gamma": a.min_snr_gamma}
    return [(f"{kind}_r{r}", {**common, "network.rank": r, "network.alpha": float(r),
                              "network.conv_rank": r if kind == "locon" else 0, "network.conv_alpha": float(r)})
            for kind in a.kinds for r in a.ranks]


def run_seed(a: argparse.Namespace, ck, work: Path, seed: int) -> list[dict]:
    """Train (unless --lora) and score every job on one seed's dataset, prompts and noise."""
    loras = work / f"seed{seed}" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    data = write_datasets(work / f"seed{seed}" / "data", a.images, seed)
    style: str | None = "style"
    if a.style == "none":
        style = None
    elif a.style:
        shutil.copyfile(a.style, loras / "style.safetensors")
    else:
        train(ck, data["diagonal"], loras, "style", {**KOHYA, "learning_rate": a.lr}, a.steps, 0, a.batch, seed + 3)
    render = measure.LoraRenderer(ck, [loras])
    rows = []
    try:
        base = measure.base_accuracy(render, (), a.n, seed + 102)
        jobs = []
        for i, f in enumerate(a.lora):       # someone else's files: scored as they are
            stem = f"file{i}"
            shutil.copyfile(f, loras / f"{stem}.safetensors")
            jobs.append((f.stem, stem, None, None))
        jobs_to_train = [] if a.lora else _jobs(a)
        regs: dict[str, tuple[Path, float]] = {}   # reg= value -> (folder, seconds to draw), once per seed
        for reg in dict.fromkeys(str(s["reg"]) for _, s in jobs_to_train if s.get("reg")):
            shapes = reg_shapes(reg)
            t0 = time.time()
            folder = work / f"seed{seed}" / ("reg" if shapes is None else "reg-" + "-".join(shapes))
            regs[reg] = (write_base_reg(ck, folder, a.reg_images, seed + 104, shapes=shapes),
                         round(time.time() - t0, 1))
            print(f"seed {seed}: drew {a.reg_images} regularisation images ({reg}) with the base in "
                  f"{regs[reg][1]:.0f}s", file=sys.stderr)
        for label, settings in jobs_to_train:
            reg_dir, reg_s = regs.get(str(settings.get("reg")), (None, None))
            path, clock = train(ck, data["star"], loras, label, settings, a.steps, a.eval_every, a.batch, seed + 2,
                                reg_dir)
            print(f"seed {seed}: trained {label} in {max(clock.values()):.0f}s", file=sys.stderr)
            jobs.append((label, path.stem, clock, reg_s))
        render.refresh()
        for label, stem, clock, reg_seconds in jobs:
            path = loras / f"{stem}.safetensors"
            row = {"name": label, "seed": seed, **score_file(render, stem, a.n, seed, style), "base": base,
                   "mb": round(path.stat().st_size / 1e6, 2), "reg_seconds": reg_seconds}
            if clock is not None:
                steps = sorted(clock)
                inter = sorted((int(f.stem.rpartition("-step")[2]), f.stem)
                               for f in loras.glob(f"{stem}-step*.safetensors")) + [(steps[-1], stem)]
                row["curve"] = curve(render, inter, a.probe, seed)
                step80 = first_reaching(row["curve"])
                row["steps_to_80"] = step80
                row["seconds_to_80"] = round(clock[step80], 1) if step80 else None
                row["seconds"] = round(clock[steps[-1]], 1)
            else:
                from lib_lora.fileio import load_safetensors
                meta = load_safetensors(path)[1]
                row["steps"] = f"({meta['ss_steps']})" if meta.get("ss_steps") else None
            rows.append(row)
    finally:
        render.close()
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'lora':<14} {'seed':>4} {'acq@0':>6} {'@0.5':>6} {'@1':>6} {'base':>6} {'base+L':>7} {'compose':>8} "
          f"{'80% step':>9} {'80% s':>7} {'train s':>8} {'MB':>6}")
    for r in rows:
        print(f"{r['name'][-14:]:<14} {r['seed']:>4} {r['acq']['0']:6.2f} {r['acq']['0.5']:6.2f} "
              f"{r['acq']['1']:6.2f} {r['base']:6.2f} {r['base_with']:7.2f} {_fmt(r.get('compose')):>8} "
              f"{_fmt(r.get('steps_to_80', r.get('steps'))):>9} {_fmt(r.get('seconds_to_80')):>7} "
              f"{_fmt(r.get('seconds')):>8} {r['mb']:6.2f}"
              + (f"  (+{r['reg_seconds']:.0f}s drawing reg images)" if r.get("reg_seconds") is not None else "")
              + ("  curve " + " ".join(f"{k}:{v:.2f}" for k, v in r["curve"].items()) if r.get("curve") else ""))


def print_means(rows: list[dict]) -> None:
    """Per LoRA label: the mean over seeds (and the spread of acq@1), for the multi-seed comparison."""
    labels = list(dict.fromkeys(r["name"] for r in rows))
    print(f"\nmean over seeds {sorted({r['seed'] for r in rows})}")
    print(f"{'lora':<14} {'acq@1':>6} {'(min-max)':>10} {'base':>6} {'base+L':>7} {'train s':>8}")
    for lab in labels:
        rs = [r for r in rows if r["name"] == lab]
        acq = [r["acq"]["1"] for r in rs]
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        secs = [r["seconds"] for r in rs if r.get("seconds") is not None]
        print(f"{lab[-14:]:<14} {sum(acq) / len(acq):6.2f} {f'{min(acq):.2f}-{max(acq):.2f}':>10} "
              f"{mean('base'):6.2f} {mean('base_with'):7.2f} {_fmt(sum(secs) / len(secs) if secs else None):>8}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, help="base checkpoint (default: the bundled toy-sd1)")
    ap.add_argument("--lora", type=Path, action="append", default=[], help="score this file (repeatable); "
                    "no training")
    ap.add_argument("--style", help="style LoRA file for the composition column (default: train one; "
                                    "'none': skip the column)")
    ap.add_argument("--write-dataset", type=Path, metavar="DIR", help="write the datasets and exit")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                    help="train the kohya-equivalent baseline and this override of it (request keys, e.g. "
                         "'snr:min_snr_gamma=5,lr_scheduler=cosine'); repeatable; replaces --kinds/--ranks")
    ap.add_argument("--compare-defaults", action="store_true", help="our shipped toy preset against the "
                    "kohya-equivalent settings, over --seeds (default 0 1 2): the README's table")
    ap.add_argument("--no-baseline", action="store_true", help="with --variant: skip the kohya-equivalent run")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--kinds", nargs="+", default=["lora", "locon"], choices=["lora", "locon"],
                    help="lora: attention/linear layers only; locon: also the resnet convs (conv rank = rank)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--text-encoder", action="store_true", help="also train text-encoder LoRA (same lr)")
    ap.add_argument("--min-snr-gamma", type=float, help="min-SNR loss weighting (kohya's --min_snr_gamma)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--reg-images", type=int, default=60, help="with a --variant's reg=base: regularisation "
                    "images drawn by the base model per seed")
    ap.add_argument("--n", type=int, default=30, help="prompts per measured setting")
    ap.add_argument("--probe", type=int, default=15, help="prompts per intermediate-file check")
    ap.add_argument("--seeds", type=int, nargs="+", help="one full run per seed: dataset, "
                    "initialisation, noise and prompts")
    ap.add_argument("--out", type=Path, help="keep files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    a.seeds = a.seeds or ([0, 1, 2] if a.compare_defaults else [0])

    import torch
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if a.write_dataset:
        for k, v in write_datasets(a.write_dataset, a.images, a.seeds[0]).items():
            print(f"{k}: {v}")
        return 0

    from lib_lora.hosts.cli.checkpoint import load_checkpoint
    from lib_lora.toyworld.base_model import DEFAULT_PATH

    work = a.out or Path(tempfile.mkdtemp(prefix="concept-bench-"))
    ck = load_checkpoint(a.base or DEFAULT_PATH)
    t_all = time.time()
    rows = [r for seed in a.seeds for r in run_seed(a, ck, work, seed)]
    print(f"\nconcept 'star' (trigger zkx), {a.n} prompts per setting, base {a.base or DEFAULT_PATH.name}"
          + ("" if a.lora else f", {a.steps} steps of batch {a.batch}") + f"; total {time.time() - t_all:.0f}s")
    print_rows(rows)
    if len(a.seeds) > 1:
        print_means(rows)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if not a.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
