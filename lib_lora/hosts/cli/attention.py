"""PyTorch's fused attention for LDM/SGM CrossAttention, outside the WebUI.

The WebUI swaps in its own attention optimisations; the CLI host holds the plain
``ldm`` modules, whose reference attention materialises the full similarity matrix
(and keeps it for backward).  ``sdpa_attention`` gives those instances an SDPA forward
for the duration of a block and removes it afterwards, leaving the modules unchanged.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

from torch import nn
from torch.nn import functional as F

from ...instance_forward import instance_forward


def _sdpa_forward(self, x, context=None, mask=None, **_):
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b = q.shape[0]
    q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.reshape(b, 1, 1, -1).bool()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


def sdpa_attention(*roots: nn.Module) -> AbstractContextManager[int]:
    """Use SDPA in every LDM/SGM ``CrossAttention`` under ``roots``; yields how many were switched."""
    return instance_forward((m for r in roots for m in r.modules()
                             if type(m).__name__ == "CrossAttention" and hasattr(m, "to_q")), _sdpa_forward)
