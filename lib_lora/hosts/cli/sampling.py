"""The noise schedule and the samplers (DDIM, Euler) the CLI host renders with, and txt2img over a model."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import Tensor, nn

from ...training.model import Conditioning, SizeCond

if TYPE_CHECKING:
    from PIL import Image


class Txt2ImgModel(Protocol):
    """What :func:`sample` uses of a model; a :class:`.checkpoint.Checkpoint` is one."""

    unet: nn.Module
    config: dict[str, Any]

    @property
    def prediction(self) -> str: ...

    @property
    def resolution(self) -> int: ...

    @property
    def vae_scale(self) -> int: ...

    def alphas_cumprod(self) -> Tensor: ...

    def encode_text(self, prompts: list[str], size_conds: list[SizeCond] | None = None,
                    clip_skip: int | None = None) -> Conditioning: ...

    def decode_latents(self, latents: Tensor) -> Tensor: ...


def alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> Tensor:
    """ldm's "linear" schedule (diffusers' "scaled_linear"): betas = linspace(sqrt(start), sqrt(end))**2,
    computed in float64 like ldm's make_beta_schedule."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, int(timesteps), dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def sample_latents(model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, alphas_cumprod: Tensor, steps: int,
                   prediction: str = "epsilon", sampler: str = "ddim",
                   progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Denoise unit-variance ``noise`` with ``model(x, t) -> eps | v`` (t: float timesteps [B]).

    ddim: eta 0 on ldm's "uniform" timesteps (1000//steps apart, +1), final alpha = alphas_cumprod[0]
    (= diffusers DDIMScheduler with steps_offset=1, set_alpha_to_one=False).
    euler: k-diffusion's Euler on the discrete model's sigmas (t = linspace(999, 0, steps), log-sigma
    interpolation, then 0) as the WebUI's "Euler" runs it; v-models via CompVisVDenoiser's scalings.
    ``progress(done, steps)`` is called after each step.
    """
    if prediction not in ("epsilon", "v"):
        raise ValueError(f"unknown prediction type {prediction!r}")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    # float32 throughout: enough for 1000-step schedules, and MPS has no float64
    acp = alphas_cumprod.to(noise.device, torch.float32)
    T = len(acp)
    n = noise.shape[0]
    x = noise.float()

    def run(x_in: Tensor, t: float) -> Tensor:
        return model(x_in, torch.full((n,), float(t), device=noise.device)).float()

    if sampler == "ddim":
        c = max(T // steps, 1)
        ts = torch.clamp(torch.arange(steps) * c + 1, max=T - 1).flip(0).tolist()
        for i, t in enumerate(ts):
            a, a_prev = acp[t], (acp[ts[i + 1]] if i + 1 < len(ts) else acp[0])
            out = run(x, t)
            if prediction == "v":
                eps, x0 = a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out
            else:
                eps, x0 = out, (x - (1 - a).sqrt() * out) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            if progress:
                progress(i + 1, steps)
        return x
    if sampler == "euler":
        log_sigmas = ((1 - acp) / acp).sqrt().log()
        t_grid = torch.linspace(T - 1, 0, steps, device=noise.device)
        lo, hi = t_grid.floor().long(), t_grid.ceil().long()
        w = t_grid - lo
        sigmas = torch.cat([((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp(), t_grid.new_zeros(1)])
        x = x * sigmas[0]
        for i in range(steps):
            s = sigmas[i]
            out = run(x / (s ** 2 + 1).sqrt(), t_grid[i].item())
            if prediction == "v":
                denoised = x / (s ** 2 + 1) - out * s / (s ** 2 + 1).sqrt()
            else:
                denoised = x - out * s
            x = x + (x - denoised) / s * (sigmas[i + 1] - s)
            if progress:
                progress(i + 1, steps)
        return x
    raise ValueError(f"unknown sampler {sampler!r} (ddim, euler)")


def sample(checkpoint: Txt2ImgModel, prompts: str | list[str], negative: str | list[str] = "", steps: int = 20,
           cfg: float = 7.0, seed: int = 0, width: int | None = None, height: int | None = None,
           sampler: str = "ddim", progress: Callable[[int, int], None] | None = None,
           clip_skip: int | None = None) -> list[Image.Image]:
    """txt2img with classifier-free guidance; image i uses noise from ``seed + i`` (as the WebUI).
    ``progress(done, steps)`` is called after each sampling step; ``clip_skip`` is kohya's (a LoRA
    trained with it renders with it).

    Runs the modules as they are, so LoRAs merged by the patcher or hooked onto them take part.
    """
    from PIL import Image

    ck = checkpoint
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    width, height = width or ck.resolution, height or ck.resolution
    u = ck.config["unet"]
    latent_ch = ck.config["vae"]["ddconfig"]["z_channels"]
    if u["in_channels"] != latent_ch:
        raise ValueError(f"UNet takes {u['in_channels']} channels (inpainting/other conditioning); "
                         f"txt2img needs {latent_ch}")
    multiple = ck.vae_scale * 2 ** (len(u["channel_mult"]) - 1)
    if width % multiple or height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple} for this model, got {width}x{height}")
    unet = ck.unet
    p = next(unet.parameters())
    shape = (latent_ch, height // ck.vae_scale, width // ck.vae_scale)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(prompts))]).to(p.device)
    with torch.no_grad():
        sizes = [((height, width), (0, 0), (height, width))] * len(prompts)
        cond, unc = ck.encode_text(prompts, sizes, clip_skip), ck.encode_text(negatives, sizes, clip_skip)

        def run(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
            kw = {"y": y.to(p.dtype)} if y is not None else {}
            return unet(x.to(p.dtype), t, context=context.to(p.dtype), **kw).float()

        def model(x: Tensor, t: Tensor) -> Tensor:
            if cond.context.shape[1] == unc.context.shape[1]:
                y = torch.cat([unc.y, cond.y]) if cond.y is not None else None
                uncond, c = run(torch.cat([x, x]), torch.cat([t, t]), torch.cat([unc.context, cond.context]), y).chunk(2)
            else:   # prompt and negative of different chunk counts run apart, as in the WebUI (no padding)
                uncond, c = run(x, t, unc.context, unc.y), run(x, t, cond.context, cond.y)
            return uncond + cfg * (c - uncond)

        latents = sample_latents(model, noise, ck.alphas_cumprod(), steps, ck.prediction, sampler, progress)
        pixels = ck.decode_latents(latents).float()
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
