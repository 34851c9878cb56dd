"""The VAE posterior sample's seed follows what the latent caches key on (the image's path), so caching
never changes which latent a sample trains on."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from lib_lora.training.dataset import ImageItem, Sample
from lib_lora.training.latents import LatentCache


class _SamplingModel:
    """A VAE stand-in whose latent is a draw from the global RNG, as a posterior sample is."""
    device = torch.device("cpu")
    model_hash, model_name = "m", "m"

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.randn(pixels.shape[0], 4, 2, 2)


def _cache(caching: bool) -> LatentCache:
    dataset = SimpleNamespace(pixels=lambda s: torch.zeros(3, 16, 16),
                              config=SimpleNamespace(all_settings=lambda: []))
    cfg = SimpleNamespace(seed=7, cache_latents=caching, cache_latents_to_disk=False)
    return LatentCache(_SamplingModel(), dataset, cfg)


def _sample(path: Path, subset: int, is_reg: bool) -> Sample:
    item = ImageItem(path, "x", 1, is_reg, path.parent.name, (16, 16), (16, 16), (16, 16), subset=subset)
    return Sample(item, (16, 16), "x", False, (16, 16), (0, 0))


def test_one_image_in_two_subsets_trains_the_same_latent_cached_or_not(tmp_path):
    """A datasets config may list one image folder in two subsets (or as train and reg data): the caches hold
    one latent per image path, so the sample drawn for it must not depend on the subset."""
    img = tmp_path / "imgs" / "1.png"
    first, second = _sample(img, 0, False), _sample(img, 1, True)
    cached = _cache(True)
    cached.encode([first])
    got = cached.encode([second])
    fresh = _cache(False).encode([second])
    torch.testing.assert_close(got, fresh, rtol=0, atol=0)
