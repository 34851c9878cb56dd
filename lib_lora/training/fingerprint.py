"""A loaded model's fingerprint: taken before and after a training job to prove the model untouched.

Training only puts LoRA modules beside the host's layers; any write to a weight or buffer, a
swapped tensor, a changed flag, or a hook or instance forward left behind shows as a different
fingerprint.
"""
from __future__ import annotations

import torch

from .model import TrainableModel


def _checksum(t: torch.Tensor) -> tuple[int, int]:
    """Two sums over the tensor's bit pattern (plain and position-weighted): any write shows."""
    t = t.detach()
    n = t.numel()
    if n == 0:
        return (0, 0)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = t.contiguous().reshape(-1).view(ints).to(torch.int64)
    weights = torch.arange(n, device=bits.device, dtype=torch.int64) % 65521 + 1
    return int(bits.sum()), int((bits * weights).sum())


def model_fingerprint(model: TrainableModel) -> list:
    """Identity, device, version counter and a checksum of every parameter and buffer, plus hooks and
    instance forwards.

    Not the storage address: restoring a LoRA that a generation merged between two training steps
    writes the original values back, but on a GPU into the merged tensor's storage (the patcher
    keeps originals on the CPU), so the address may change while the weights are bitwise the same."""
    out = []
    roots = [("unet", model.unet)] + [(p, m) for p, m in model.text_encoders]
    with torch.no_grad():
        for label, root in roots:
            for name, t in list(root.named_parameters()) + list(root.named_buffers()):
                out.append((label, name, id(t), str(t.device), t._version, t.dtype, tuple(t.shape),
                            bool(getattr(t, "requires_grad", False)), _checksum(t)))
            hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())
            forwards = tuple(i for i, m in enumerate(root.modules()) if "forward" in vars(m))  # instance forwards
            modes = tuple(m.training for m in root.modules())
            out.append((label, "<hooks/modes>", hooks, forwards, hash(modes)))
    return out
