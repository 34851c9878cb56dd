"""An offline Hugging Face cache entry for ``openai/clip-vit-large-patch14``: tokenizer + config, no weights.

SD1 checkpoints load CLIP ViT-L/14's tokenizer and config by that hub name (the weights come from
the checkpoint).  Without network access the files are rebuilt here from the BPE table open_clip
ships — the same table CLIP's tokenizer was made from — laid out as the hub's vocab.json and
merges.txt are: 256 byte tokens, the same with ``</w>``, one token per merge, then the two specials.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from pathlib import Path

REPO = "openai/clip-vit-large-patch14"
N_MERGES = 49152 - 256 - 2  # what CLIP's tokenizer uses of the table
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json")

TEXT_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
               "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
VISION_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768}


def hub_cache() -> Path:
    """Where huggingface_hub looks, from the same variables it reads."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def cached_snapshot(cache: Path) -> Path | None:
    """A snapshot of REPO in ``cache`` holding the tokenizer and config, if there is one."""
    for snap in sorted((cache / f"models--{REPO.replace('/', '--')}" / "snapshots").glob("*")):
        if all((snap / f).is_file() for f in ("vocab.json", "merges.txt", "config.json")):
            return snap
    return None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map, in the order CLIP numbers its byte tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe() -> Path:
    spec = importlib.util.find_spec("open_clip")  # located, not imported (it imports torch)
    if spec is None or not spec.origin:
        raise FileNotFoundError("open_clip_torch is not installed: it ships the CLIP BPE table")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def clip_l_files(bpe: Path) -> dict[str, str]:
    """File name -> text of the tokenizer and config files."""
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:N_MERGES + 1]  # line 0 is the table's own header
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(tokens) == TEXT_CONFIG["vocab_size"]

    def special(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                        "errors": "replace", "add_prefix_space": False, "unk_token": special(EOS),
                        "bos_token": special(BOS), "eos_token": special(EOS), "pad_token": EOS}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
              "logit_scale_init_value": 2.6592, "initializer_factor": 1.0,
              "text_config": {**TEXT_CONFIG, "model_type": "clip_text_model"},
              "vision_config": {**VISION_CONFIG, "model_type": "clip_vision_model"}}
    return {
        "vocab.json": json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "\n".join(["#version: 0.2", *merges]) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                                               "pad_token": EOS}, indent=2),
        "config.json": json.dumps(config, indent=2),
    }


def write_snapshot(cache: Path, bpe: Path | None = None) -> Path:
    """Write REPO's files as a hub cache snapshot (``refs/main`` included) under ``cache``; its folder."""
    files = clip_l_files(bpe or open_clip_bpe())
    revision = hashlib.sha1("".join(files[f] for f in FILES).encode()).hexdigest()
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snap / name).write_text(text, encoding="utf-8")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    # transformers < 4.31 asks for a one-time cache migration (and warns offline) without this marker
    (cache / "version.txt").write_text("1")
    return snap
