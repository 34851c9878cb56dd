"""What LoRA Workshop needs from the program it runs inside (WebUI, CLI, tests).

The core (library, runtime, patcher) never imports a host; a host hands it a ModelMap and
carries messages back to the user.  The encode/decode hooks are placeholders for training,
which will need the host's own text encoders and VAE (with its tokenizer quirks, devices
and precision) rather than re-implementing them.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..modelmap import ModelMap


@runtime_checkable
class Host(Protocol):
    name: str

    def model_map(self, model: Any = None) -> ModelMap | None:
        """The map of the current (or given) model; None when no supported model is loaded."""
        ...

    def lora_dirs(self) -> list[Path]:
        """Folders scanned for LoRA files, most important first."""
        ...

    def notify(self, message: str, p: Any = None, show: bool = True) -> None:
        """Tell the user: always on the console, in the generation info when ``show``."""
        ...

    def queue_lock(self) -> AbstractContextManager:
        """The lock that serialises work on the model (generation, training)."""
        ...

    # -- training hooks (stubs until the training work lands) -------------------------
    def encode_text(self, prompts: list[str]) -> Any:
        """Text-encoder conditioning for ``prompts`` exactly as the host computes it."""
        ...

    def vae_encode(self, images: Any) -> Any:
        """Latents for a batch of images (N, 3, H, W in [-1, 1])."""
        ...

    def vae_decode(self, latents: Any) -> Any:
        """Images for a batch of latents."""
        ...
