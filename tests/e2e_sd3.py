"""SD3 in the real WebUI: a tiny SD3 checkpoint it loads, and kohya- and diffusers-spelled LoRAs on it.

Heavy (the WebUI hardcodes CLIP-G's and CLIP-L's sizes, so the checkpoint is about 1.8 GB in fp16),
so it runs only with WEBUI_E2E_SD3=1, on a WebUI of its own.  The checkpoint is written in the
WebUI's venv from the WebUI's own classes (``modules/models/sd3``): its MMDiT at depth 2, the
smallest that has a context block that is not ``pre_only`` (hidden width 64 * depth, as the
WebUI infers it from ``x_embedder.proj.weight``), its fixed-size VAE, and CLIP-L / CLIP-G under
``text_encoders.*`` at the sizes ``sd3_cond.py`` hardcodes, read from that file, so that it
downloads nothing.  T5 stays off (``sd3_enable_t5`` is off by default), but the WebUI builds
google/t5-v1_1-xxl's tokenizer either way: a small one with T5's special tokens is written into an
offline hub cache.  The LoRAs' shapes are read from the checkpoint, not from our model index.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from webui_server import WEBUI_SD3_IMPORTS, StartError, data_dir, pixels, running, webui_python

SD3_ON = os.environ.get("WEBUI_E2E_SD3") == "1"
KOHYA, DIFFUSERS = "e2e_sd3_kohya", "e2e_sd3_diffusers"
DEPTH = 2
NEEDS_DISK, NEEDS_RAM = 4 * 2**30, 8 * 2**30  # the 1.8 GB file with room; the builder's and the WebUI's fp32 copies

# Runs in the WebUI's venv: argv = webui dir, checkpoint path, hub cache dir, MMDiT depth.
_BUILD = r'''
import ast, hashlib, sys, types
from pathlib import Path
import torch
webui, ckpt, hub, depth = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, str(webui))
''' + WEBUI_SD3_IMPORTS + r'''from modules.models.sd3.sd3_impls import SDVAE
from safetensors.torch import save_file

# the text encoders' sizes as sd3_cond.py hardcodes them (that module imports the whole WebUI)
tree = ast.parse((webui / "modules" / "models" / "sd3" / "sd3_cond.py").read_text())
cfg = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
       if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in ("CLIPL_CONFIG", "CLIPG_CONFIG")}
torch.set_grad_enabled(False)
torch.manual_seed(0)
sd = {}
def add(prefix, module):
    sd.update({prefix + k: v.detach().half().contiguous() for k, v in module.state_dict().items()})
hidden = 64 * depth
# 16 latent channels and the text widths are what SD3Inferencer feeds it: CLIP-L+G pooled (768+1280)
# and the token features padded to T5's 4096; pos_embed_max_size 8 fits up to 128 px at patch 2
mmdit = MMDiT(input_size=None, pos_embed_max_size=8, num_patches=64, patch_size=2, in_channels=16, depth=depth,
              adm_in_channels=768 + 1280,
              context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
              dtype=torch.float32, device="cpu")
mmdit.pos_embed.normal_(0, 0.5)  # a real checkpoint holds sin-cos positions here, not the zeros it starts with
add("model.diffusion_model.", mmdit)
del mmdit
add("first_stage_model.", SDVAE(dtype=torch.float32, device="cpu"))
add("text_encoders.clip_l.", other_impls.SDClipModel(layer="hidden", layer_idx=-2, device="cpu", dtype=torch.float32,
    layer_norm_hidden_state=False, return_projected_pooled=False, textmodel_json_config=cfg["CLIPL_CONFIG"]))
add("text_encoders.clip_g.", other_impls.SDXLClipG(cfg["CLIPG_CONFIG"], device="cpu", dtype=torch.float32))
save_file(sd, str(ckpt))

# T5's tokenizer: built from its special tokens and letters; only its special ids are read while T5 is off
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5TokenizerFast
vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'()-_"]
tok = Tokenizer(models.Unigram(vocab, unk_id=2))
tok.pre_tokenizer = pre_tokenizers.Metaspace()
tok.decoder = decoders.Metaspace()
tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=100)
repo = hub / "models--google--t5-v1_1-xxl"
rev = hashlib.sha1(tok.to_str().encode()).hexdigest()
t5.save_pretrained(str(repo / "snapshots" / rev))
(repo / "refs").mkdir(parents=True, exist_ok=True)
(repo / "refs" / "main").write_text(rev)
print("built", len(sd), "tensors")
'''


def tiny_sd3_checkpoint(webui: Path, ckpt: Path, hub: Path) -> None:
    """Write the checkpoint (the WebUI's own classes, random weights, fp16) and T5's tokenizer into ``hub``."""
    hub.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([webui_python(webui), "-c", _BUILD, str(webui), str(ckpt), str(hub), str(DEPTH)],
                       cwd=webui, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        ckpt.unlink(missing_ok=True)
        pytest.skip(f"cannot build a tiny SD3 checkpoint with this WebUI: {r.stderr[-1500:]}")


def write_sd3_loras(ckpt: Path, lora_dir: Path) -> dict[str, Path]:
    """A kohya-spelled and a diffusers(PEFT)-spelled LoRA, each on MMDiT layers and both CLIP encoders;
    every shape is the checkpoint's own layer's."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt), "pt") as f:
        def shape(key: str) -> tuple[int, int]:
            return tuple(f.get_slice(key + ".weight").get_shape())

        mm, te = "model.diffusion_model.joint_blocks.", "text_encoders.clip_{}.transformer.text_model.encoder.layers."
        kohya = {  # kohya name -> the checkpoint's layer
            "lora_unet_joint_blocks_0_x_block_attn_qkv": mm + "0.x_block.attn.qkv",
            "lora_unet_joint_blocks_0_context_block_attn_qkv": mm + "0.context_block.attn.qkv",
            "lora_unet_joint_blocks_0_context_block_attn_proj": mm + "0.context_block.attn.proj",
            "lora_unet_joint_blocks_1_x_block_mlp_fc1": mm + "1.x_block.mlp.fc1",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": te.format("l") + "0.self_attn.q_proj",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1": te.format("g") + "0.mlp.fc1",
        }
        kohya_shapes = {k: shape(v) for k, v in kohya.items()}
        qkv = shape(mm + "0.x_block.attn.qkv")
        hidden = qkv[1]
        diffusers = {  # diffusers name -> (out, in); q/k/v are thirds of the fused qkv
            "transformer.transformer_blocks.0.attn.to_q": (hidden, hidden),
            "transformer.transformer_blocks.0.attn.to_k": (hidden, hidden),
            "transformer.transformer_blocks.0.attn.to_v": (hidden, hidden),
            "transformer.transformer_blocks.0.attn.add_k_proj": (hidden, hidden),
            "transformer.transformer_blocks.0.attn.to_out.0": shape(mm + "0.x_block.attn.proj"),
            "transformer.transformer_blocks.1.ff.net.2": shape(mm + "1.x_block.mlp.fc2"),
            "text_encoder.text_model.encoder.layers.1.self_attn.v_proj": shape(te.format("l") + "1.self_attn.v_proj"),
            "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj":
                shape(te.format("g") + "1.self_attn.out_proj"),
        }
    assert qkv == (3 * hidden, hidden) and hidden == 64 * DEPTH, qkv
    g = torch.Generator().manual_seed(3)
    rank = 4
    k_sd, d_sd = {}, {}
    for name, (out, inp) in kohya_shapes.items():
        k_sd[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) * 0.3).half()
        k_sd[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.3).half()
        k_sd[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    for name, (out, inp) in diffusers.items():
        d_sd[f"{name}.lora_A.weight"] = (torch.randn(rank, inp, generator=g) * 0.3).half()
        d_sd[f"{name}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.3).half()
    paths = {KOHYA: lora_dir / f"{KOHYA}.safetensors", DIFFUSERS: lora_dir / f"{DIFFUSERS}.safetensors"}
    save_file(k_sd, str(paths[KOHYA]), metadata={"ss_base_model_version": "sd3", "ss_network_module": "networks.lora_sd3"})
    save_file(d_sd, str(paths[DIFFUSERS]))
    return paths


@pytest.fixture(scope="module")
def sd3_server(tmp_path_factory):
    if not SD3_ON:
        pytest.skip("set WEBUI_E2E_SD3=1 to load a tiny SD3 checkpoint (about 1.8 GB, written and deleted here)")
    webui = Path(os.environ["WEBUI_DIR"])
    if not (webui / "modules" / "models" / "sd3" / "mmdit.py").is_file():
        pytest.skip(f"{webui} has no SD3 support (modules/models/sd3)")
    data = tmp_path_factory.mktemp("webui-sd3")
    free_disk = shutil.disk_usage(data).free
    if free_disk < NEEDS_DISK:
        pytest.skip(f"a tiny SD3 checkpoint needs {NEEDS_DISK / 2**30:.0f} GiB free at {data}, "
                    f"{free_disk / 2**30:.1f} GiB are")
    free_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if free_ram is not None and free_ram < NEEDS_RAM:
        pytest.skip(f"the WebUI holds a tiny SD3 model in fp32 (CLIP-G alone is 2.8 GB): needs "
                    f"{NEEDS_RAM / 2**30:.0f} GiB of free memory, {free_ram / 2**30:.1f} GiB are")
    ckpt_dir, lora_dir = data_dir(data, builtin_off=os.environ.get("WEBUI_E2E_DISABLE_BUILTIN_LORA") == "1")
    # live previews would load the SD3 preview decoder, which the WebUI downloads (vaeapprox-sd3.pt); T5 stays
    # off as by default (it would be built at 4096 wide and downloaded, the checkpoint holding none)
    config = data / "config.json"
    settings = json.loads(config.read_text()) if config.exists() else {}
    config.write_text(json.dumps({**settings, "live_previews_enable": False, "sd3_enable_t5": False}))
    ckpt = ckpt_dir / "tiny_sd3.safetensors"
    hf_home = data / "hf"
    try:
        tiny_sd3_checkpoint(webui, ckpt, hf_home / "hub")
        print(f"tiny SD3 checkpoint: {ckpt.stat().st_size / 2**20:.0f} MiB")
        loras = write_sd3_loras(ckpt, lora_dir)
        with running(webui, data, ckpt, loras[KOHYA], hf_home=hf_home, ready="/lora-workshop/v1/loras",
                     timeout=float(os.environ.get("WEBUI_E2E_TIMEOUT", "1800"))) as srv:
            srv.sd3_loras = loras
            yield srv
    except StartError as e:
        pytest.fail(str(e))
    finally:
        ckpt.unlink(missing_ok=True)


def test_sd3_checkpoint_loads_as_sd3(sd3_server):
    status, models = sd3_server.request("GET", "/sdapi/v1/sd-models")
    assert status == 200 and [m["model_name"] for m in models] == ["tiny_sd3"], models
    res = sd3_server.txt2img("a photo")  # waits for the model, which loads in the background
    assert res["info"]["sd_model_name"] == "tiny_sd3", res["info"]
    log = sd3_server.log.read_text(errors="replace")
    assert "sd3-inference.yaml" in log, sd3_server.log_tail()
    assert "Downloading" not in log, sd3_server.log_tail()


@pytest.mark.parametrize("name", [KOHYA, DIFFUSERS])
def test_sd3_lora_applies_writes_hashes_and_restores(sd3_server, name):
    from lib_lora.hashes import addnet_hash_safetensors

    plain = sd3_server.txt2img("a photo")
    with_lora, log = sd3_server.txt2img_logged(f"a photo <lora:{name}:1>")
    again = sd3_server.txt2img("a photo")
    params = with_lora["info"]["extra_generation_params"]
    assert params.get("Lora hashes") == f"{name}: {addnet_hash_safetensors(sd3_server.sd3_loras[name])[:12]}", params
    assert "Lora hashes" not in plain["info"]["extra_generation_params"]
    # every activation message (unmatched layers, a hand-over to the built-in, a failed apply) says
    # [LoRA Workshop]; the built-in, had it been handed the generation, would list "Networks with errors"
    ours = [line for line in log.splitlines() if "[LoRA Workshop]" in line or "Traceback" in line
            or "Networks with errors" in line]
    assert not ours, "\n".join(ours)
    for text in (*with_lora["info"]["infotexts"], json.dumps(params)):
        assert "counterpart" not in text and "did not match" not in text and "skipped" not in text, text
    changed = sum(a != b for a, b in zip(pixels(with_lora["image"]), pixels(plain["image"])))
    print(f"{name}: {changed} of {len(pixels(plain['image']))} values changed")
    assert changed, f"{name} changed nothing"
    assert again["image"] == plain["image"], f"{name}: weights were not restored exactly"
