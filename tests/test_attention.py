import torch

from lib_lora.hosts.cli.attention import sdpa_attention
from tiny_models import build_sd1, build_sdxl


def test_sdpa_matches_ldm_attention_and_is_removed():
    for tiny in (build_sd1(seed=0), build_sdxl(seed=0)):
        unet = tiny.unet
        ctx_dim = unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.in_features
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
        t = torch.tensor([10, 900])
        kw = {"y": torch.randn(2, unet.label_emb[0][0].in_features, generator=g)} if tiny.family == "sdxl" else {}
        with torch.no_grad():
            ref = unet(x, t, context=ctx, **kw)
            with sdpa_attention(unet) as n:
                assert n > 0
                fast = unet(x, t, context=ctx, **kw)
            again = unet(x, t, context=ctx, **kw)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(again, ref)
        assert not any("forward" in vars(m) for m in unet.modules())
