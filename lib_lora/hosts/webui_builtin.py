"""Hand SD3 generations we cannot patch to the WebUI's built-in Lora extension.

LoRA Workshop takes the ``<lora:>`` token from the built-in (``Workshop.claim``) and patches the
WebUI's SD3 itself (ModelMap, family "sd3").  Where it cannot (a requested file it cannot find,
read or match to a single SD3 layer, or an SD3 model whose layout it does not know) the built-in
may still manage: its handler object is kept when we replace it, and that generation's tokens go
to it exactly as the WebUI would have passed them.  The two never both apply:

- before the built-in gets a generation, our merges are put back;
- once a generation is ours again, the built-in's networks are unloaded and its layers put back
  at once.  It would otherwise restore them lazily, at each layer's next forward, i.e. after
  our merge, and take our merged weights for the original.

Without the built-in, we patch what we can and say what we skipped; for an SD3 model we cannot
map at all, one message, and the image is still made.

Also here: whether the built-in is enabled (and LoRA Block Weight, which leans on it), and the
built-in's ``networks`` module, which training checks too.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any

from .. import params
from ..fileio import LoraFileError
from ..patcher import bind
from .webui_settings import OPT_SHOW_WARNINGS

BUILTIN_CLASS = "ExtraNetworkLora"  # extensions-builtin/Lora/extra_networks_lora.py
NEEDS_BUILTIN = ("SD3 LoRAs need the WebUI's built-in Lora extension (Extensions tab: enable \"Lora\"), "
                 "LoRA Workshop cannot apply these to SD3 — skipped: {names}")


def builtin_lora_active() -> bool:
    """Whether the WebUI's own Lora extension (extensions-builtin/Lora) is loaded."""
    try:
        from modules import extensions
        return any(ext.is_builtin and ext.canonical_name == "lora" for ext in extensions.active())
    except Exception:  # very old or unusual WebUI: fall back to its module being imported
        return builtin_networks_module() is not None


def addnet_extension_active() -> bool:
    """Whether the sd-webui-additional-networks extension fills txt2img's fields from its own infotext keys."""
    from modules import scripts
    fields = getattr(getattr(scripts, "scripts_txt2img", None), "infotext_fields", None) or []
    return any(isinstance(f, tuple) and len(f) > 1 and f[1] == "AddNet Module 1" for f in fields)


def lbw_switched_off(p: Any) -> bool:
    """Whether LoRA Block Weight runs in this generation with its panel switched off (its "useblocks", the
    second of its script arguments, False): it then applies no ``lbw=``/``lbwe=``/``start=``/``stop=``, and
    neither does the built-in, so a prompt's LoRAs apply at their plain weights."""
    args = getattr(p, "script_args", None)
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []:
        if str(getattr(script, "filename", "") or "").replace("\\", "/").endswith("/lora_block_weight.py"):
            start, end = getattr(script, "args_from", None), getattr(script, "args_to", None)
            if args is None or start is None or end is None or end - start < 2:
                return False
            return args[start + 1] is False
    return False


def lbw_active() -> bool:
    """Whether the LoRA Block Weight extension is enabled (under any folder name containing its own)."""
    try:
        from modules import extensions
        return any("lora-block-weight" in ext.canonical_name for ext in extensions.active())
    except Exception:  # an unusual WebUI: we cannot tell, and the warning is only advice
        return False


def builtin_networks_module() -> Any:
    """The built-in's ``networks`` module if loaded (it is imported by that bare name)."""
    mod = sys.modules.get("networks")
    return mod if mod is not None and hasattr(mod, "loaded_networks") and hasattr(mod, "load_networks") else None


class BuiltinHandoff:
    """The built-in's ``<lora:>`` handler, and whether it has networks loaded because of us."""

    def __init__(self, workshop: Any):
        self.workshop = workshop
        self.handler: Any = None
        self._patched: weakref.ref | None = None  # the model the built-in last loaded networks for
        self._had_generation = False

    def remember(self, handler: Any) -> None:
        """Called with whatever "lora" handler we are about to replace; keeps it if it is the built-in's."""
        if handler is not None and handler is not self.workshop.network and type(handler).__name__ == BUILTIN_CLASS:
            self.handler = handler

    def available(self) -> Any:
        return self.handler if self.handler is not None and builtin_lora_active() else None

    def native(self, model: Any, params_list: list[Any]) -> bool:
        """Whether we patch this SD3 generation ourselves: we know the model's layout and every
        requested file matches it (or there is no built-in that could do better)."""
        ws = self.workshop
        mm = ws.host.model_map(model)
        if mm is None:
            return False
        if self.available() is None:
            return True
        requests, _ = params.requests_from_items([params.items for params in params_list], ws.default_weight())
        for req in requests:
            try:
                net = ws.library.load(ws.library.resolve(req.name))
            except (LookupError, LoraFileError, OSError, ValueError, RuntimeError):
                return False  # a file we cannot use: the built-in may still apply it
            if net.family not in (None, mm.family) or not bind(net, mm).pairs:
                return False
        return True

    def route(self, p: Any, params_list: list[Any]) -> bool:
        """True when this activation is not ours: the built-in got it, or SD3 LoRAs had to be skipped."""
        ws = self.workshop
        model = ws.host.current_model()
        if not getattr(model, "is_sd3", False) or self.native(model, params_list):
            self.release()
            self._had_generation = False
            return False
        ws.runtime.set_model(None)  # our merges come out before the built-in's go in
        handler = self.available()
        if handler is None:
            self._had_generation = False
            names = [str(params.items[0]) for params in params_list if getattr(params, "items", None)]
            if names:
                ws.host.notify(NEEDS_BUILTIN.format(names=", ".join(names)), p,
                               show=bool(ws.host.option(OPT_SHOW_WARNINGS)))
            return True
        handler.activate(p, params_list)
        self._patched = weakref.ref(model) if model is not None else None
        self._had_generation = True
        return True

    def deactivate(self, p: Any) -> None:
        """The built-in's own end-of-generation report (its per-network error counts), if it had the generation."""
        handler = self.available()
        if self._had_generation and handler is not None:
            handler.deactivate(p)

    def release(self) -> None:
        """Unload what the built-in loaded for us and put its layers back now, not at their next forward."""
        if self._patched is None:
            return
        model, self._patched = self._patched(), None
        mod = builtin_networks_module()
        if mod is None:
            return
        if mod.loaded_networks:
            # what its handler's activate does with no tokens, minus adding the "sd_lora" setting's network
            mod.load_networks([])
        apply_weights = getattr(mod, "network_apply_weights", None)
        if model is None or not callable(apply_weights) or not callable(getattr(model, "modules", None)):
            return
        for module in model.modules():
            if getattr(module, "network_current_names", ()):
                apply_weights(module)  # with nothing loaded: restores the layer's backup
