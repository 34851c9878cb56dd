"""AUTOMATIC1111 stable-diffusion-webui host (written against v1.10.1): the ``<lora:>`` token.

- ``LoraNetwork``: the WebUI's handler of ``<lora:...>`` (and ``<lyco:...>``) tokens;
- ``Workshop``: Library + Runtime + the WebUI objects (handler, cards page, built-in handoff),
  and what the script's callbacks do; one per process, kept across "Reload UI" (this module
  stays in ``sys.modules`` while the script file is re-executed), so the parsed-file cache survives.

Around it: ``webui_host`` (the model map, folders, messages, lock), ``webui_model`` (where the
WebUI keeps the model's parts), ``webui_settings``, ``webui_cards`` (the Extra Networks page),
``webui_builtin`` (the built-in Lora), ``webui_embeddings`` (bundled embeddings in the WebUI's embedding
database).  ``webui_training``, ``webui_tools`` and ``webui_routes`` sit above this module and use its
``Workshop``.

Coexistence with the built-in Lora extension: see ``claim`` and docs/coexistence (README).
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from modules import extra_networks, paths, shared, ui_extra_networks

from .. import blockweights, elementweights, live
from .. import params as lora_params
from ..fit import FitCache
from ..infotext import KEY as HASHES_KEY, addnet_tokens, format_hashes, paste_rename
from ..library import Library
from ..runtime import ActivationResult, Runtime
from . import webui_settings as settings
from .webui_builtin import (BuiltinHandoff, addnet_extension_active, builtin_lora_active, builtin_networks_module,
                            lbw_active, lbw_switched_off)
from .webui_cards import LoraPage
from .webui_embeddings import BundledEmbeddings
from .webui_host import WebUIHost, log, use_original_torch_load

NETWORK_NAME = "lora"
NETWORK_ALIASES = ("lyco",)
_remove_symbols = str.maketrans("", "", ":,")


# -- WebUI classes -------------------------------------------------------------------------------


class LoraNetwork(extra_networks.ExtraNetwork):
    """Handler of ``<lora:...>`` and ``<lyco:...>`` tokens."""

    def __init__(self, workshop: "Workshop"):
        super().__init__(NETWORK_NAME)
        self.workshop = workshop

    def activate(self, p, params_list):
        self.workshop.drop_embeddings()  # the previous activation's bundled embeddings, whoever handles this one
        if self.workshop.hand_to_builtin(p, params_list):
            return
        self.workshop.activate(p, [params.items for params in params_list])

    def deactivate(self, p):
        self.workshop.builtin_deactivate(p)
        self.workshop.deactivate(p)


# -- the workshop ------------------------------------------------------------------------------


class Workshop:
    """Library + Runtime + the WebUI objects, and what the script's callbacks do."""

    def __init__(self, host: WebUIHost | None = None):
        use_original_torch_load()
        self.host = host or WebUIHost()
        dirs = self.host.lora_dirs()
        try:
            dirs[0].mkdir(parents=True, exist_ok=True)  # like the built-in, so users see where to put files
        except OSError:
            pass
        self.library = Library(dirs, cache_bytes=self._cache_bytes(),
                               follow_outside_links=bool(self.host.option(settings.OPT_OUTSIDE_LINKS)),
                               hash_store=self.host.hash_store(), on_outside_links=self._outside_links,
                               hashing=not getattr(shared.cmd_opts, "no_hashing", False))
        self.runtime = Runtime(self.library)
        self.fits = FitCache()  # what cards of files that name no family say about the loaded model
        self.lbw_presets = blockweights.PresetSource(self.host.lbw_presets_files)
        self.lbw_element_presets = blockweights.PresetSource(
            lambda: self.host.lbw_presets_files(elementweights.ELEMENT_PRESETS_FILE,
                                                settings.OPT_LBW_ELEMENT_PRESETS),
            elementweights.load_element_presets, elementweights.DEFAULT_ELEMENT_PRESETS)
        self.network = LoraNetwork(self)
        self.page = LoraPage(self)
        self.builtin = BuiltinHandoff(self)
        self.embeddings = BundledEmbeddings(self.host.option)
        self._warned: set[str] = set()
        self._ui_claim_pending = False

    # settings -----------------------------------------------------------------------------------
    def _cache_bytes(self) -> int:
        try:
            mb = float(self.host.option(settings.OPT_CACHE_MB))
        except (TypeError, ValueError):
            mb = settings.DEFAULTS[settings.OPT_CACHE_MB]
        return max(0, int(mb)) << 20

    def default_weight(self) -> float:
        try:
            return float(self.host.option(settings.OPT_DEFAULT_WEIGHT))
        except (TypeError, ValueError):
            return settings.DEFAULTS[settings.OPT_DEFAULT_WEIGHT]

    def api_dataset_roots(self) -> list[Path]:
        """Folders whose datasets API requests may read: the WebUI's data folder and the listed ones."""
        listed = str(self.host.option(settings.OPT_DATASET_ROOTS) or "")
        return [Path(paths.data_path)] + [Path(x.strip()).expanduser() for x in listed.split(",") if x.strip()]

    def _outside_links(self, links: list[str]) -> None:
        shown = ", ".join(links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
        self.host.notify(f"{len(links)} link(s) in the LoRA folders point outside them and are not listed: {shown} "
                         "(Settings → LoRA Workshop → \"Index files that symlinks in the LoRA folder point to outside "
                         "it\" lists them)", show=False)

    def apply_cache_setting(self) -> None:
        self.library.set_cache_bytes(self._cache_bytes())

    def apply_links_setting(self) -> None:
        self.library.follow_outside_links = bool(self.host.option(settings.OPT_OUTSIDE_LINKS))
        self.library.refresh()

    def register_settings(self) -> None:
        """on_ui_settings: our section of the WebUI's settings (webui_settings)."""
        settings.register(self.apply_cache_setting, self.apply_links_setting, builtin_lora_active())

    # registry / page ----------------------------------------------------------------------------
    def claim(self) -> None:
        """Make our handler and page the only "lora" ones, whatever ran before.

        The registry is a dict keyed by name and pages are a list, so whoever registers last
        wins; the built-in registers in its before_ui callback, and before_ui callbacks run
        in reverse load order (user-adjustable).  Calling this after every before_ui (first
        component, app start, each generation) makes the outcome independent of that order.
        """
        reg = extra_networks.extra_network_registry
        if reg.get(NETWORK_NAME) is not self.network:
            self.builtin.remember(reg.get(NETWORK_NAME))
            reg[NETWORK_NAME] = self.network
        for alias in NETWORK_ALIASES:
            extra_networks.extra_network_aliases[alias] = self.network
            other = reg.get(alias)
            if other is not None and other is not self.network:
                self._warn_once(f"registry:{alias}", f"another extension handles <{alias}:...> tokens "
                                f"({type(other).__module__}); LoRA Workshop only handles <lora:...>")
        pages = ui_extra_networks.extra_pages
        if any(pg is not self.page and getattr(pg, "name", None) == self.page.name for pg in pages) \
                or self.page not in pages:
            keep = [pg for pg in pages if pg is self.page or getattr(pg, "name", None) != self.page.name]
            if self.page not in keep:
                keep.append(self.page)
            pages[:] = keep
            # same bookkeeping as register_page: preview files are served only from these folders
            ui_extra_networks.allowed_dirs.clear()
            ui_extra_networks.allowed_dirs.update(
                set(sum([pg.allowed_directories_for_previews() for pg in pages], [])))

    def register(self) -> None:
        """on_before_ui: register like any extension, then take over from the built-in."""
        self.builtin.remember(extra_networks.extra_network_registry.get(NETWORK_NAME))
        extra_networks.register_extra_network(self.network)
        for alias in NETWORK_ALIASES:
            extra_networks.register_extra_network_alias(self.network, alias)
        if self.page not in ui_extra_networks.extra_pages:
            ui_extra_networks.register_page(self.page)
        self.claim()
        self._ui_claim_pending = True

    def claim_once_for_ui(self) -> None:
        """on_before_component: claim once per UI build, then cost nothing for later components."""
        if self._ui_claim_pending:
            self._ui_claim_pending = False
            self.claim()

    # generation -------------------------------------------------------------------------------------
    def current_family(self) -> str | None:
        mm = self.runtime.model_map
        if mm is not None:
            return mm.family
        return None

    def _sync_model(self) -> None:
        mm = self.host.model_map()
        if mm is None and self.host.current_model() is not None:
            self._warn_once("family", "the loaded model type is not supported (SD1, SD2 and SDXL are) — LoRAs skipped")
        self.runtime.set_model(mm)

    def activate(self, p: Any, items_lists: list[list[Any]]) -> ActivationResult:
        """ExtraNetwork.activate: make exactly these LoRAs active (none = restore the model)."""
        items_lists = self._with_builtin_extra(p, [list(items) for items in items_lists])
        requests, messages = lora_params.requests_from_items(items_lists, self.default_weight(),
                                                         presets=self.lbw_presets.lazy(),
                                                         element_presets=self.lbw_element_presets.lazy())
        if any(r.per_layer or r.scheduled for r in requests) and lbw_switched_off(p):
            requests = [replace(r, blocks=None, elements=None, start=None, stop=None) for r in requests]
            messages.append("LoRA Block Weight is switched off for this generation: its lbw=/lbwe=/start=/stop= "
                            "are not applied (as with LoRA Block Weight itself)")
        if getattr(p, "is_hr_pass", False) and not self.host.option(settings.OPT_SCHEDULE_HIRES):
            # LBW's step ranges are used up by the first pass; its hires pass has the LoRA at full weight
            requests = [r.without_schedule() if r.scheduled else r for r in requests]
        if not requests and not messages and not self.runtime.active:
            return ActivationResult()  # the common no-LoRA generation: nothing to build or restore
        self._check_builtin_idle()
        self.runtime.dora_mode = "webui" if self.host.option(settings.OPT_BUILTIN_DORA) else "lycoris"
        if requests and lbw_active() and not builtin_lora_active():
            # LBW finds no built-in `networks` module then and sets p.disable_extra_networks per batch
            self._warn_once("lbw-alone", "LoRA Block Weight is enabled while the built-in Lora extension is not: it "
                            "switches extra networks off for each batch. LoRA Workshop reads lbw=/start=/stop= "
                            "itself, so disable LoRA Block Weight (or enable the built-in Lora)")
        try:
            self._sync_model()
            res = self.runtime.activate(requests, steps=True)
        except Exception as e:  # the patcher has put the weights back; the image is made without LoRAs
            res = ActivationResult(messages=[f"LoRA Workshop: applying LoRAs failed, generating without them "
                                             f"({type(e).__name__}: {e})"])
        res.messages[:0] = messages
        try:  # before the prompt is encoded, so its conditioning sees them
            res.messages.extend(self.embeddings.register(self.host.current_model(), res.embeddings))
        except Exception as e:
            self.drop_embeddings()
            res.messages.append(f"LoRA Workshop: registering bundled embeddings failed ({type(e).__name__}: {e})")
        self._write_hashes(p, res)
        self._write_live(p, res)
        show = bool(self.host.option(settings.OPT_SHOW_WARNINGS))
        for msg in dict.fromkeys(res.messages):
            self.host.notify(msg, p, show=show)
        if res.missing and self.host.option("lora_not_found_gradio_warning"):  # the built-in's setting
            self.host.popup(f"Lora not found: {', '.join(dict.fromkeys(res.missing))}")
        return res

    def before_generation(self) -> None:
        """scripts.process, before the first activation of a generation: our handler is the one, and no
        start=/stop= hooks and no bundled embeddings of an earlier generation remain (the WebUI skips
        deactivate when one fails, and skips activate where ``p.disable_extra_networks``)."""
        self.claim()
        self.runtime.drop_schedules()
        self.drop_embeddings()

    def drop_embeddings(self) -> None:
        self.embeddings.clear(self.host.current_model())

    def deactivate(self, p: Any) -> None:
        self.drop_embeddings()  # nothing of this generation's LoRAs stays registered between generations
        if self.host.option(settings.OPT_RESTORE_AFTER):
            self.restore()
        else:
            self.runtime.drop_schedules()  # a schedule belongs to one generation; merged LoRAs stay

    def denoiser_step(self, params: Any) -> None:
        """on_cfg_denoiser, before every UNet evaluation: move scheduled LoRAs to this step.

        ``shared.state.sampling_step`` is updated after each step (and reads 0 for the first two),
        and LBW switches when ``sampling_step > start - 2``: it treats ``sampling_step + 1`` as the
        steps done.  Passing the same count makes start=/stop= switch where LBW's do.
        """
        self.runtime.set_step(int(params.sampling_step) + 1)

    def restore(self) -> int:
        return self.runtime.restore()

    def _write_hashes(self, p: Any, res: ActivationResult) -> None:
        """``Lora hashes`` infotext exactly like the built-in, accumulated over the hires pass."""
        if not self.host.option("lora_add_hashes_to_infotext"):  # the built-in's switch, if present
            return
        if not getattr(p, "is_hr_pass", False) or not isinstance(getattr(p, "lora_hashes", None), dict):
            p.lora_hashes = {}
        for name, shorthash in res.hashes:
            p.lora_hashes[name.translate(_remove_symbols)] = shorthash
        if p.lora_hashes:
            p.extra_generation_params[HASHES_KEY] = format_hashes(list(p.lora_hashes.items()))

    def _write_live(self, p: Any, res: ActivationResult) -> None:
        """Which job, step and weights each ``NAME@live`` meant, accumulated over the hires pass."""
        if not getattr(p, "is_hr_pass", False) or not isinstance(getattr(p, "lora_workshop_live", None), dict):
            p.lora_workshop_live = {}
        for name, snap in res.live:
            p.lora_workshop_live[name] = snap
        if p.lora_workshop_live:
            p.extra_generation_params[live.INFOTEXT_KEY] = live.format_infotext(list(p.lora_workshop_live.items()))

    def _with_builtin_extra(self, p: Any, items_lists: list[list[Any]]) -> list[list[Any]]:
        """Honour the built-in's "Add network to prompt" setting (sd_lora) now that we handle the token."""
        if "sd_lora" not in getattr(shared.opts, "data_labels", {}):  # the built-in is not loaded
            return items_lists
        extra = self.host.option("sd_lora", "None")
        if not extra or extra == "None" or any(items and str(items[0]) == extra for items in items_lists):
            return items_lists
        weight = self.host.option("extra_networks_default_multiplier", 1.0)
        token = f"<lora:{extra}:{weight}>"
        if isinstance(getattr(p, "all_prompts", None), list):
            p.all_prompts = [x if token in x else x + token for x in p.all_prompts]
        return [*items_lists, [extra, str(weight)]]

    def _check_builtin_idle(self) -> None:
        """The built-in patches weights only for networks in its loaded_networks; ours owns the token,
        so that list must stay empty.  If something else filled it, say so (both would apply)."""
        mod = builtin_networks_module()
        if mod is not None and getattr(mod, "loaded_networks", None):
            self._warn_once("builtin-busy", "the built-in Lora extension also has networks loaded "
                            f"({', '.join(str(getattr(n, 'name', n)) for n in mod.loaded_networks)}); "
                            "they are applied on top of LoRA Workshop's")

    def hand_to_builtin(self, p: Any, params_list: list[Any]) -> bool:
        """True when the built-in Lora handled (or had to refuse) this activation: see webui_builtin."""
        return self.builtin.route(p, params_list)

    def builtin_deactivate(self, p: Any) -> None:
        self.builtin.deactivate(p)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log(message)

    # other callbacks -----------------------------------------------------------------------------------
    def model_loaded(self, sd_model: Any) -> None:
        """A checkpoint was (re)loaded: new map; the previous model's backups are restored or dropped."""
        self.host.forget_model()
        mm = self.host.model_map(sd_model)
        self.runtime.set_model(mm)

    def infotext_pasted(self, infotext: str, params: dict) -> None:
        if not builtin_lora_active() and isinstance(params.get("Prompt"), str) and not addnet_extension_active():
            added = addnet_tokens(params)   # the built-in's own paste callback does this when it is enabled
            if added:
                params["Prompt"] += "\n" + "".join(added)
        value = params.get(HASHES_KEY)
        if not value:
            return
        by_filename = self.host.option("lora_preferred_name") == "Filename"   # as the cards name files
        for key in ("Prompt", "Negative prompt", "Hires prompt", "Hires negative prompt"):
            if isinstance(params.get(key), str):
                params[key] = paste_rename(params[key], str(value), self.library, by_filename)


_workshop: Workshop | None = None
_workshop_lock = threading.Lock()


def get_workshop() -> Workshop:
    global _workshop
    with _workshop_lock:
        if _workshop is None:
            _workshop = Workshop()
        return _workshop


_T = TypeVar("_T")


class PerWorkshop(Generic[_T]):
    """One object per process made from the current Workshop (a job runner): kept across "Reload UI"
    like the Workshop, made again only for a new Workshop."""

    def __init__(self, make: Callable[[Workshop], _T]):
        self._make = make
        self._lock = threading.Lock()
        self.current: _T | None = None
        self._workshop: Workshop | None = None

    def get(self, workshop: Workshop | None = None) -> _T:
        ws = workshop or get_workshop()
        with self._lock:
            if self.current is None or self._workshop is not ws:
                self.current, self._workshop = self._make(ws), ws
            return self.current
