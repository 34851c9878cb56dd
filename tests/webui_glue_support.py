"""The stand-in WebUI's tiny SD1 and the drivers that the tests of the WebUI glue share (test_webui_glue.py,
test_webui_cards.py, test_webui_lbw.py, test_webui_sd3.py; their fixtures are conftest's ``sd1``, ``model``,
``webui`` and ``sd1_map``).

A tiny real SD1 model (ldm UNet + HF CLIP text encoder) sits where the WebUI keeps them; ``WebUI`` drives a
generation's extra-network part; ``BuiltinLora`` stands in for the built-in Lora extension's registrations.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

STUB = Path(__file__).resolve().parent / "webui_stub"
if str(STUB) not in sys.path:
    sys.path.insert(0, str(STUB))

from modules import extensions, extra_networks, processing, script_callbacks, scripts, sd_hijack, ui_extra_networks  # noqa: E402

fastapi = pytest.importorskip("fastapi")

from lib_lora.fileio import save_safetensors  # noqa: E402
from lib_lora.hosts import webui as host  # noqa: E402
from lib_lora.modelmap import ModelMap  # noqa: E402

TE_KEY = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
RANK, ALPHA = 4, 2.0
SD1_META = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
            "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)}


# -- a tiny SD1 model laid out like the WebUI's ----------------------------------------------------


class FrozenCLIPEmbedder(nn.Module):  # ldm's embedder: the HF model is .transformer
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class FrozenOpenCLIPEmbedder(nn.Module):  # ldm/sgm OpenCLIP embedders: the open_clip model is .model
    def __init__(self, model):
        super().__init__()
        self.model = model


class WithCustomWords(nn.Module):  # sd_hijack's wrapper: the original embedder is .wrapped
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def tokenize(self, texts):
        """One id per word (what ``register_embedding_by_name`` asks of the model's ``cond_stage_model``)."""
        return [[1 + zlib.crc32(w.encode()) % 997 for w in text.split()] for text in texts]


def encode_prompt(sd_model, prompt: str, seen: list | None = None) -> torch.Tensor:
    """The stand-in of sd_hijack_clip for an SD1 ``cond_stage_model``: the prompt's words as token ids, a
    registered embedding's name replaced by its vectors (``embedding_db.find_embedding_at_position``), spliced
    into the token embeddings' output (as EmbeddingsWithFixes does), then the text encoder.  ``seen``
    collects (position, vectors spliced in)."""
    cond = sd_model.cond_stage_model
    words = cond.tokenize([prompt])[0]
    db = sd_hijack.model_hijack.embedding_db
    ids, fixes, i = [0], [], 0  # position 0: the start token
    while i < len(words):
        emb, n = db.find_embedding_at_position(words, i)
        if emb is None:
            ids.append(words[i])
            i += 1
            continue
        fixes.append((len(ids), emb.vec))
        ids.extend([0] * emb.vec.shape[0])
        i += n
    te = cond.wrapped.transformer

    def splice(_, __, out):
        out = out.clone()
        for pos, vec in fixes:
            out[0, pos:pos + vec.shape[0]] = vec.to(out.dtype)
            if seen is not None:
                seen.append((pos, vec))
        return out

    handle = te.get_input_embeddings().register_forward_hook(splice)
    try:
        with torch.no_grad():
            return te(input_ids=torch.tensor([ids])).last_hidden_state
    finally:
        handle.remove()


class DiffusionWrapper(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class FakeSdModel(nn.Module):
    def __init__(self, unet=None, cond=None, conditioner=None, **flags):
        super().__init__()
        self.model = DiffusionWrapper(unet) if unet is not None else None
        if cond is not None:
            self.cond_stage_model = cond
        if conditioner is not None:
            self.conditioner = conditioner
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = (flags.get(k, False) for k in
                                                               ("is_sd1", "is_sd2", "is_sdxl", "is_sd3"))


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=1000))


def tiny_sd1():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(0)
    unet = UNetModel(image_size=32, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2,
                     attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], num_heads=2,
                     use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False)
    return FakeSdModel(unet, WithCustomWords(FrozenCLIPEmbedder(tiny_clip())), is_sd1=True)


class TinyOpenClip(nn.Module):
    """Just the module names of open_clip's text tower that LoRAs address."""

    def __init__(self, width=16):
        super().__init__()
        block = nn.Module()
        block.attn = nn.MultiheadAttention(width, 2)
        block.mlp = nn.Sequential()
        block.mlp.add_module("c_fc", nn.Linear(width, 2 * width))
        block.mlp.add_module("c_proj", nn.Linear(2 * width, width))
        block.ln_1, block.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([block])
        self.ln_final = nn.LayerNorm(width)


def make_lora(path: Path, mm: ModelMap, seed=0, metadata=None, only=None) -> Path:
    """Random kohya LoRA on every linear layer of the map (rank 4, alpha 2)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for t in mm.targets:
        w = t.weight()
        if w is None or w.dim() != 2 or "embedding" in t.key or (only and not any(s in t.key for s in only)):
            continue
        sd[f"{t.key}.lora_down.weight"] = torch.randn(RANK, w.shape[1], generator=g) * 0.1
        sd[f"{t.key}.lora_up.weight"] = torch.randn(w.shape[0], RANK, generator=g) * 0.1
        sd[f"{t.key}.alpha"] = torch.tensor(ALPHA)
    return save_safetensors(sd, path, metadata=metadata or {}, overwrite=True)


def lora_delta(path: Path, key: str) -> torch.Tensor:
    from safetensors.torch import load_file
    sd = load_file(str(path))
    return sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"] * (ALPHA / RANK)


def card_click(js: str, opts: dict) -> str:
    """What a card's ``prompt`` (the JavaScript expression the WebUI's ``cardClicked`` gets) evaluates to
    in a browser whose settings are ``opts``: run by node where there is one, else read here (string
    literals and ``opts.NAME`` joined by ``+``, numbers spelt as JavaScript spells them)."""
    node = shutil.which("node")
    if node:
        script = f"const opts = {json.dumps(opts)}; process.stdout.write(String({js}));"
        return subprocess.run([node, "-e", script], check=True, capture_output=True, text=True).stdout
    token = r'"(?:[^"\\]|\\.)*"|opts\.\w+|\+'
    assert not re.sub(token, "", js).strip(), f"not a card prompt: {js}"
    out = []
    for part in re.findall(token, js):
        if part.startswith('"'):
            out.append(json.loads(part))
        elif part != "+":
            v = opts[part[5:]]
            out.append(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return "".join(out)


# -- the stand-in WebUI ---------------------------------------------------------------------------


class WebUI:
    """One fresh WebUI process (conftest's stand-in), driven a step at a time: load the script, start the
    UI, run a generation's extra-network part."""

    def __init__(self, base):
        self.base, self.tmp, self.lora_dir, self.mp = base, base.tmp, base.lora_dir, base.mp

    @property
    def script(self):
        return self.base.script

    def load_script(self):
        return self.base.load_script()

    @property
    def workshop(self) -> host.Workshop:
        return self.script.workshop

    def start_ui(self, app=None):
        """webui(): before_ui callbacks, create_ui (its first component), then app_started."""
        script_callbacks.before_ui_callback()
        script_callbacks.before_component_callback(object(), elem_id="txt2img_prompt")
        app = app or fastapi.FastAPI()
        script_callbacks.app_started_callback(None, app)
        return app

    def process(self, p) -> None:
        """Our scripts' ``process`` hooks, which process_images_inner runs before its batches (also with
        ``p.disable_extra_networks``, where it skips the extra networks)."""
        if self.script is not None:
            for cls in [c for c in vars(self.script).values() if isinstance(c, type) and issubclass(c, scripts.Script)
                        and c is not scripts.Script]:
                cls().process(p)

    def generate(self, prompt: str, hr: bool = False, p=None):
        """The extra-network part of process_images_inner: parse, activate (deactivate separately)."""
        p = p or processing.StableDiffusionProcessingTxt2Img(prompt=prompt)
        p.is_hr_pass = hr
        self.process(p)
        _, data = extra_networks.parse_prompts([prompt])
        p.extra_network_data = data
        extra_networks.activate(p, data)
        for c in sd_hijack.model_hijack.comments:
            p.comment(c)
        return p




class BuiltinLora:
    """What extensions-builtin/Lora registers, reduced to its registrations and its idle state."""

    def __init__(self, webui: WebUI):
        self.activations: list = []
        self.loads: list = []        # names given to networks.load_networks
        self.deactivations = 0
        path = webui.tmp / "extensions-builtin" / "Lora"
        path.mkdir(parents=True, exist_ok=True)
        self.extension = extensions.Extension("Lora", str(path), is_builtin=True)
        self.networks = types.ModuleType("networks")
        self.networks.loaded_networks = []

        def load_networks(names, *args, **kwargs):
            self.loads.append(list(names))
            self.networks.loaded_networks[:] = [types.SimpleNamespace(name=n) for n in names]

        def network_apply_weights(module):
            # its per-layer step, run at each layer's forward: back up once, then original + one per network
            wanted = tuple(n.name for n in self.networks.loaded_networks)
            if getattr(module, "network_current_names", ()) == wanted:
                return
            if getattr(module, "network_weights_backup", None) is None:
                module.network_weights_backup = module.weight.detach().clone()
            with torch.no_grad():
                module.weight.copy_(module.network_weights_backup + len(wanted))
            module.network_current_names = wanted

        self.networks.load_networks = load_networks
        self.networks.network_apply_weights = network_apply_weights
        webui.mp.setitem(sys.modules, "networks", self.networks)
        extensions.extensions.append(self.extension)
        outer = self

        class ExtraNetworkLora(extra_networks.ExtraNetwork):
            def __init__(self):
                super().__init__("lora")

            def activate(self, p, params_list):
                outer.activations.append(params_list)
                load_networks([params.items[0] for params in params_list])

            def deactivate(self, p):
                outer.deactivations += 1

        class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
            def __init__(self):
                super().__init__("Lora")

            def list_items(self):
                return []

            def allowed_directories_for_previews(self):
                return [str(webui.lora_dir)]

        def before_ui():
            ui_extra_networks.register_page(ExtraNetworksPageLora())
            net = ExtraNetworkLora()
            extra_networks.register_extra_network(net)
            extra_networks.register_extra_network_alias(net, "lyco")

        def app_started(_, app):
            app.add_api_route("/sdapi/v1/loras", lambda: ["builtin"], methods=["GET"])
            app.add_api_route("/sdapi/v1/refresh-loras", lambda: None, methods=["POST"])

        self.before_ui, self.app_started = before_ui, app_started

    def forward(self, model: nn.Module) -> None:
        """A denoising step: each linear layer's forward hook patches or restores it."""
        for m in model.modules():
            if isinstance(m, nn.Linear):
                self.networks.network_apply_weights(m)

    def load(self):
        script_callbacks.add_callback(script_callbacks.callback_map["callbacks_before_ui"], self.before_ui,
                                      category="before_ui", filename="extensions-builtin/Lora/scripts/lora_script.py")
        script_callbacks.add_callback(script_callbacks.callback_map["callbacks_app_started"], self.app_started,
                                      category="app_started", filename="extensions-builtin/Lora/scripts/lora_script.py")
