"""Aspect-ratio buckets, following the conventions kohya-ss/sd-scripts users know.

Buckets let images of any shape be trained without squashing: each image goes to
the bucket whose aspect ratio is closest to its own, is scaled so it *covers* the
bucket, and only the overhang is cropped.  Every image in a batch shares a bucket,
so batches stack into one tensor.

Two modes, as in kohya:

* predefined (default): resolutions with area <= resolution², sides between
  ``min_reso`` and ``max_reso``, multiples of ``step``.  Images are scaled up or
  down to fit the chosen bucket.
* ``no_upscale``: each image gets a bucket from its own size, rounded down to the
  step (after shrinking to the area budget if it is larger), so small images are
  never enlarged.  min/max bucket sizes do not apply in this mode (kohya ignores
  them too).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height), PIL order


def parse_resolution(value: int | str | tuple[int, int] | list[int]) -> Size:
    """``512``, ``"512"``, ``"512,768"`` (width,height) or ``(512, 768)`` -> (w, h)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"resolution {value!r} is not a number or 'width,height'") from None
    elif isinstance(value, int):
        nums = [value]
    else:
        nums = [int(v) for v in value]
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) <= 0:
        raise ValueError(f"resolution {value!r} must be one positive size or 'width,height'")
    return nums[0], nums[1]


def make_buckets(resolution: Size, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list[Size]:
    """All bucket sizes for a resolution, sorted.

    The square bucket is the largest step-multiple square within the area budget.
    Then for every width from ``min_reso`` to ``max_reso`` the tallest height that
    keeps the area within budget is paired with it, both ways round.
    """
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area)) // step * step
    found = {(side, side)}
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (area // w) // step * step)
        if h >= min_reso:
            found.add((w, h))
            found.add((h, w))
    return sorted(found)


@dataclass(frozen=True)
class Assignment:
    bucket: Size   # final training size (w, h)
    resized: Size  # size the image is scaled to before cropping to ``bucket``


class BucketTooSmall(ValueError):
    """The image is smaller than one bucket step (only possible with no_upscale)."""


class Bucketer:
    """Chooses a bucket for each image size; stateless, so safe to share."""

    def __init__(self, resolution: Size, min_reso: int = 256, max_reso: int = 1024, step: int = 64,
                 no_upscale: bool = False, enabled: bool = True) -> None:
        self.resolution, self.step, self.no_upscale, self.enabled = resolution, step, no_upscale, enabled
        self.max_area = resolution[0] * resolution[1]
        self.resolutions: list[Size] = make_buckets(resolution, min_reso, max_reso, step) if enabled else [resolution]
        self._ratios = [w / h for w, h in self.resolutions]

    def _floor(self, x: float) -> int:
        """Round to the nearest pixel, then down to the step (kohya's rounding)."""
        n = int(x + 0.5)
        return n - n % self.step

    def assign(self, width: int, height: int) -> Assignment:
        if not self.enabled:  # one fixed size for everything (no_upscale only concerns buckets)
            return Assignment(self.resolution, cover_size((width, height), self.resolution))
        if self.no_upscale:
            return self._assign_no_upscale(width, height)
        ratio = width / height
        if (width, height) in self.resolutions:  # already bucket-sized: no resampling at all
            bucket = (width, height)
        else:  # first of the sorted buckets with the smallest ratio error, so ties are deterministic
            i = min(range(len(self._ratios)), key=lambda k: abs(self._ratios[k] - ratio))
            bucket = self.resolutions[i]
        return Assignment(bucket, cover_size((width, height), bucket))

    def _assign_no_upscale(self, width: int, height: int) -> Assignment:
        ratio = width / height
        resized = (width, height)
        if width * height > self.max_area:
            # Shrink to the area budget keeping the aspect ratio.  Rounding width or
            # height to the step gives slightly different shapes; keep whichever
            # stays closer to the image's own ratio.
            w = math.sqrt(self.max_area * ratio)
            h = self.max_area / w
            w_first = self._floor(w)
            h_of_w = self._floor(w_first / ratio)
            h_first = self._floor(h)
            w_of_h = self._floor(h_first * ratio)
            err_w = abs(w_first / h_of_w - ratio) if h_of_w else math.inf
            err_h = abs(w_of_h / h_first - ratio) if h_first else math.inf
            if err_w < err_h:
                resized = (w_first, int(w_first / ratio + 0.5))
            else:
                resized = (int(h_first * ratio + 0.5), h_first)
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        if min(bucket) <= 0:
            raise BucketTooSmall(f"{width}x{height} is smaller than bucket_reso_steps={self.step} "
                                 "and bucket_no_upscale forbids enlarging it")
        return Assignment(bucket, resized)


def cover_size(size: Size, bucket: Size) -> Size:
    """Smallest scaling of ``size`` that covers ``bucket`` (one side matches, the other overhangs)."""
    w, h = size
    bw, bh = bucket
    if w / h > bw / bh:  # wider than the bucket: match heights, crop the sides
        scale = bh / h
    else:
        scale = bw / w
    # max() guards against float rounding leaving the overhanging side a pixel short.
    return max(bw, int(w * scale + 0.5)), max(bh, int(h * scale + 0.5))


def crop_offset(resized: Size, bucket: Size, rng: random.Random | None = None) -> tuple[int, int]:
    """(left, top) of the bucket-sized window in the resized image: centred, or random when ``rng`` is given."""
    dx, dy = resized[0] - bucket[0], resized[1] - bucket[1]
    if rng is None:
        return dx // 2, dy // 2
    return rng.randint(0, dx), rng.randint(0, dy)
