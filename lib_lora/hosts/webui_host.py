"""The WebUI as the runtime's host: the loaded model's ``ModelMap``, the LoRA folders, messages,
the queue lock and our settings' values.

The runtime's seam is small: ``Runtime.set_model(model_map)`` then ``activate``/``restore``
(runtime.py); ``webui.Workshop`` drives it with what ``WebUIHost`` finds.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from pathlib import Path
from typing import Any

from modules import hashes, paths, shared

from .. import blockweights, fileio
from ..modelmap import ModelMap
from .webui_model import model_family, text_encoder_roots, unet_root
from .webui_settings import BUILTIN_DEFAULTS, DEFAULTS, LBW_FOLDER, OPT_LBW_PRESETS


def log(message: str) -> None:
    """A line on the WebUI's console."""
    print(f"[LoRA Workshop] {message}", flush=True)


class WebUIHost:
    """What the runtime and the cards need from the WebUI; one per ``Workshop``."""

    def __init__(self) -> None:
        self._cached: tuple[tuple[weakref.ref, ...], ModelMap] | None = None
        self._lock = threading.Lock()

    # model ---------------------------------------------------------------------------------
    def current_model(self) -> Any:
        return shared.sd_model

    def model_map(self, model: Any = None) -> ModelMap | None:
        """ModelMap of ``model`` (default: shared.sd_model), rebuilt only when the model or one of
        its root modules is a different object (weak references, so old models can be freed)."""
        sd_model = self.current_model() if model is None else model
        if sd_model is None:
            return None
        family = model_family(sd_model)
        if family is None:
            return None
        unet, tes = unet_root(sd_model), text_encoder_roots(sd_model, family)
        objs = [sd_model, *([unet] if unet is not None else []), *(m for _, m in tes)]
        with self._lock:
            if self._cached is not None:
                refs, mm = self._cached
                if len(refs) == len(objs) and all(r() is o for r, o in zip(refs, objs)) and mm.family == family:
                    return None if family == "sd3" and not len(mm) else mm
            mm = ModelMap.build(family, unet, tes)
            try:  # an empty map is cached too: the same model is not walked again at every generation
                self._cached = (tuple(weakref.ref(o) for o in objs), mm)
            except TypeError:  # an object without weakref support: do not cache
                self._cached = None
            # an SD3 that is not the WebUI's layout: nothing we know how to patch
            return None if family == "sd3" and not len(mm) else mm

    def forget_model(self) -> None:
        with self._lock:
            self._cached = None

    # files ------------------------------------------------------------------------------------
    @staticmethod
    def hash_store() -> "WebUIHashCache":
        return WebUIHashCache()

    def lora_dirs(self) -> list[Path]:
        """--lora-dir (models/Lora by default) and the built-in's --lyco-dir-backcompat if present."""
        opts = shared.cmd_opts
        main = getattr(opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
        dirs = [Path(main)]
        lyco = getattr(opts, "lyco_dir_backcompat", None)
        if lyco and Path(lyco).is_dir() and Path(lyco).resolve() != Path(main).resolve():
            dirs.append(Path(lyco))
        return dirs

    def lbw_presets_files(self, filename: str = blockweights.PRESETS_FILE,
                          option: str = OPT_LBW_PRESETS) -> list[Path]:
        """Where LoRA Block Weight keeps its presets, most likely first (the setting overrides all).

        LBW reads ``scripts/lbwpresets.txt`` (and ``scripts/elempresets.txt``, its element presets) of
        its own folder, moving one from the WebUI's ``scripts/`` there on start; any extension folder
        holding that file is accepted.
        """
        custom = str(self.option(option) or "").strip()
        if custom:
            return [Path(custom)]
        ext = Path(paths.extensions_dir)
        first = ext / LBW_FOLDER / "scripts" / filename
        others = sorted(p for p in ext.glob(f"*/scripts/{filename}") if p != first)
        return [first, *others, Path(paths.script_path) / "scripts" / filename]

    # user feedback -------------------------------------------------------------------------
    @staticmethod
    def popup(message: str) -> None:
        """A warning toast in the browser, for the generation's request (gradio's; a no-op over the API)."""
        import gradio as gr  # only in the real WebUI
        gr.Warning(message)

    def notify(self, message: str, p: Any = None, show: bool = True) -> None:
        log(message)
        if not show:
            return
        if p is not None and callable(getattr(p, "comment", None)):
            p.comment(message)  # shown under the image and in the generation info
        else:
            from modules import sd_hijack  # copied into p.comment() by processing after activation
            if message not in sd_hijack.model_hijack.comments:
                sd_hijack.model_hijack.comments.append(message)

    def queue_lock(self) -> contextlib.AbstractContextManager:
        from modules import call_queue
        return call_queue.queue_lock

    def option(self, key: str, default: Any = None) -> Any:
        """A setting, also before/without the settings UI (api-only mode never registers them), and the
        built-in Lora's that we follow while neither it nor we registered them: their defaults then."""
        if default is None:
            default = DEFAULTS[key] if key in DEFAULTS else BUILTIN_DEFAULTS.get(key)
        return getattr(shared.opts, key, default)


def use_original_torch_load() -> None:
    """.pt/.ckpt LoRAs: modules/safe.py replaces torch.load with a checker that refuses current torch's
    zip files; fileio reads them with the original loader it keeps, always with weights_only=True."""
    from modules import safe
    original = getattr(safe, "unsafe_torch_load", None)
    if callable(original):
        fileio.use_torch_load(original)


class WebUIHashCache:
    """The WebUI's hash cache (``modules.hashes``, kept in its ``cache`` folder across restarts), under the
    titles the built-in Lora uses (``lora/STEM``), so each fills it for the other: a file hashed once by
    either is never read whole again while its mtime stays."""

    @staticmethod
    def get(path: Path, name: str, addnet: bool) -> str | None:
        return hashes.sha256_from_cache(str(path), f"lora/{name}", use_addnet_hash=addnet)

    @staticmethod
    def put(path: Path, name: str, addnet: bool, value: str, mtime: float) -> None:
        # what hashes.sha256 stores once it has computed one (it would read the file again itself)
        hashes.cache("hashes-addnet" if addnet else "hashes")[f"lora/{name}"] = {"mtime": mtime, "sha256": value}
