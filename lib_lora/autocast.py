"""Autocast queries on the torch 2.1 that WebUI 1.10 installs as well as on current torch."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

BY_DEVICE_TYPE = hasattr(torch, "get_autocast_dtype")   # torch >= 2.4


def _available(dev: str) -> bool:
    return torch.amp.is_autocast_available(dev) if hasattr(torch.amp, "is_autocast_available") \
        else dev in ("cpu", "cuda")


def autocast_state(dev: str) -> tuple[str, torch.dtype, bool]:
    """(device type, autocast dtype, enabled) for tensors on ``dev`` right now."""
    if not _available(dev):     # meta, or a device type this torch has no autocast for
        return dev, torch.float32, False
    if BY_DEVICE_TYPE:
        return dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev)
    # torch 2.1 has one function per device kind, and autocast only for CPU and CUDA
    if dev == "cpu":
        return dev, torch.get_autocast_cpu_dtype(), torch.is_autocast_cpu_enabled()
    return dev, torch.get_autocast_gpu_dtype(), torch.is_autocast_enabled()


def autocasting(dev: str) -> bool:
    return autocast_state(dev)[2]


_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Autocast off for every device type where it is on now (hosts run extra networks inside it)."""
    with contextlib.ExitStack() as stack:
        for dev in _DEVICE_TYPES:
            if autocasting(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield
