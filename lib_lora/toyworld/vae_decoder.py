"""Stage a2 of the toy base recipe (``base_model.py``): the decoder-only VAE fine-tune, and the
scorer's reading of VAE round trips that it is judged by.

Only ``post_quant_conv`` and the decoder train, on whole 64x64 FULL_WORLD images (every shape incl.
the star, every background incl. diagonal), with stage a's MSE + L1, time-boxed with a cosine lr.
The encoder is frozen, so every latent -- what the UNet learned and what LoRA training caches --
stays bit-identical.  Stage a's VAE never saw a star and rounds small stars into blobs the scorer
reads as circles, which caps what any LoRA can score; a real SD VAE draws any shape, and SD's own
ft-MSE VAE was such a decoder-only fine-tune.  Each shape the decoder learns stays a shape the UNet
has to learn: the UNet, text encoder and latent space never see it.

Also the pixel and hit-rate helpers the recipe's other stages share.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .world import BASE_WORLD, FULL_WORLD, generate


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pixels(images) -> torch.Tensor:
    """PIL images as a batch in the VAE's -1..1 range."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(batch: torch.Tensor) -> list:
    """The inverse of ``pixels``: a -1..1 batch as PIL images."""
    from PIL import Image

    arr = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def hit_rates(hits: list[dict[str, bool]]) -> dict[str, float]:
    """Fractions of ``Scoring.matches`` results right per attribute, for shape and colour together, and for all."""
    n = max(len(hits), 1)
    out = {a: sum(h[a] for h in hits) / n for a in ("shape", "colour", "background")}
    out["shape_and_colour"] = sum(h["shape"] and h["colour"] for h in hits) / n
    out["all"] = sum(all(h.values()) for h in hits) / n
    return out


def _encode_all(vae: nn.Module, pix: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        dists = [vae.encode(pix[i:i + batch]).latent_dist for i in range(0, len(pix), batch)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def recon_scorer(vae: nn.Module, world, n: int, seed: int) -> dict[str, float]:
    """The scorer's reading of the VAE's round trips (posterior mean) of ``generate(n, seed, world)``:
    the ceiling the VAE puts on how well anything generated through it can score."""
    from .scorer import score

    items = generate(n, seed, world)
    mean, _ = _encode_all(vae, pixels([im for im, _, _ in items]))
    with torch.no_grad():
        rec = torch.cat([vae.decode(mean[i:i + 64]).sample for i in range(0, len(mean), 64)])
    return hit_rates([score(im).matches(sc) for im, (_, _, sc) in zip(to_pil(rec), items)])


def recon_ceilings(vae: nn.Module, s: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``recon_scorer`` on held-out images of the base world and of each concept's world."""
    from .world import CONCEPTS

    worlds = {"base": BASE_WORLD, **{k: c.world for k, c in CONCEPTS.items()}}
    return {k: recon_scorer(vae, w, s["vae_eval_images"], s["seed"] + 22) for k, w in worlds.items()}


def finetune_decoder(s: dict[str, Any], vae: nn.Module, seconds: float) -> tuple[nn.Module, dict[str, Any]]:
    """Stage a2: train only the decoder side (``post_quant_conv`` + ``decoder``) on whole FULL_WORLD
    images, stage a's reconstruction losses.  The encoder and ``quant_conv`` are frozen, so latents --
    what the UNet was trained on and what LoRA training caches -- stay bit-identical; the decoder
    learns to draw what the base world never showed it (stars, diagonal stripes), as SD's ft-MSE VAE
    was a decoder-only fine-tune."""
    torch.manual_seed(s["seed"] + 20)
    vae.requires_grad_(False).eval()
    dec = [vae.post_quant_conv, vae.decoder]
    for m in dec:
        m.requires_grad_(True).train()
    params = [p for m in dec for p in m.parameters()]
    before = recon_ceilings(vae, s)
    data = pixels([im for im, _, _ in generate(s["dec_images"], s["seed"] + 21, FULL_WORLD)])
    mean, std = _encode_all(vae, data)  # the encoder is frozen: posteriors once, sampled each step
    opt = torch.optim.AdamW(params, lr=s["dec_lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(s["seed"] + 23)
    t0, step, losses = time.time(), 0, []
    while (elapsed := time.time() - t0) < seconds:
        idx = torch.randint(len(data), (s["dec_batch"],), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        x = data[idx]
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x)
        # time-boxed: cosine from dec_lr down to dec_final_lr of it over the budget
        f = s["dec_final_lr"] + (1 - s["dec_final_lr"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds)))
        for grp in opt.param_groups:
            grp["lr"] = s["dec_lr"] * f
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(mse.item())
        step += 1
        if step % 100 == 0:
            log(f"decoder step {step} mse {np.mean(losses[-100:]):.4f} ({elapsed:.0f}s)")
    vae.requires_grad_(False).eval()
    stats = dict(steps=step, seconds=round(time.time() - t0, 1), train_mse_last100=float(np.mean(losses[-100:])),
                 recon_scorer_before=before, recon_scorer=recon_ceilings(vae, s))
    log(f"decoder done: {stats}")
    return vae, stats
