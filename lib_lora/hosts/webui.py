"""AUTOMATIC1111 stable-diffusion-webui host (written against v1.10.1).

The only lib_lora module that imports ``modules.*``.  It holds:

- ``WebUIHost``: model map of ``shared.sd_model``, LoRA folders, messages, queue lock;
- the WebUI-facing classes (``<lora:>`` handler, Extra Networks page, notes editor);
- ``Workshop``: one per process, kept across "Reload UI" (this module stays in
  ``sys.modules`` while the script file is re-executed), so the parsed-file cache survives.

Coexistence with the built-in Lora extension: see ``claim`` and docs/coexistence (README).
"""
from __future__ import annotations

import contextlib
import html
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from modules import extra_networks, paths, shared, ui_extra_networks, ui_extra_networks_user_metadata

from .. import blockweights, cards, elementweights, families, fileio, live
from .. import metadata as lora_metadata
from .. import params as lora_params
from ..fit import FitCache
from ..infotext import KEY as HASHES_KEY, format_hashes, paste_rename
from ..library import Library, prompt_name
from ..modelmap import ModelMap
from ..runtime import ActivationResult, Runtime
from .webui_builtin import BuiltinHandoff

SECTION = ("lora_workshop", "LoRA Workshop")
OPT_CACHE_MB = "lora_workshop_cache_mb"
OPT_DEFAULT_WEIGHT = "lora_workshop_default_weight"
OPT_RESTORE_AFTER = "lora_workshop_restore_after"
OPT_SHOW_WARNINGS = "lora_workshop_show_warnings"
OPT_DATASET_ROOTS = "lora_workshop_api_dataset_roots"
OPT_BUILTIN_DORA = "lora_workshop_builtin_dora"
OPT_OUTSIDE_LINKS = "lora_workshop_follow_outside_links"
OPT_LBW_PRESETS = "lora_workshop_lbw_presets"
OPT_SCHEDULE_HIRES = "lora_workshop_schedule_hires"
OPT_LBW_ELEMENT_PRESETS = "lora_workshop_lbw_element_presets"
OPT_TRAIN_PRIORITY = "lora_workshop_train_priority"          # hosts/webui_interleave.py
OPT_TRAIN_YIELD_SECONDS = "lora_workshop_train_yield_seconds"
DEFAULTS: dict[str, Any] = {OPT_CACHE_MB: 2048, OPT_DEFAULT_WEIGHT: 1.0, OPT_RESTORE_AFTER: False,
                            OPT_SHOW_WARNINGS: True, OPT_DATASET_ROOTS: "", OPT_BUILTIN_DORA: False,
                            OPT_OUTSIDE_LINKS: False, OPT_LBW_PRESETS: "", OPT_SCHEDULE_HIRES: False,
                            OPT_LBW_ELEMENT_PRESETS: "",
                            OPT_TRAIN_PRIORITY: "Generation first", OPT_TRAIN_YIELD_SECONDS: 1.0}
LBW_FOLDER = "sd-webui-lora-block-weight"

NETWORK_NAME = "lora"
NETWORK_ALIASES = ("lyco",)
PAGE_TITLE = "Lora"  # same tab (and element ids) as the built-in, which it replaces
_remove_symbols = str.maketrans("", "", ":,")


def _log(message: str) -> None:
    print(f"[LoRA Workshop] {message}", flush=True)


# -- host --------------------------------------------------------------------------------------


def model_family(sd_model: Any) -> str | None:
    """The WebUI's own flags (sd_models.set_model_type)."""
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    return "sd1"


def _unwrap(m: Any) -> Any:
    # sd_hijack wraps each text encoder in a *WithCustomWords object holding the original in .wrapped
    return getattr(m, "wrapped", m)


def text_encoder_roots(sd_model: Any, family: str) -> list[tuple[str, torch.nn.Module]]:
    """(kohya prefix, root module) for each text encoder, where the WebUI keeps them.

    SD1: cond_stage_model[.wrapped].transformer (HF CLIPTextModel);
    SD2: cond_stage_model[.wrapped].model (OpenCLIP);
    SDXL: conditioner.embedders[i][.wrapped] with .transformer (HF, te1) or .model (OpenCLIP, te2);
    SD3: cond_stage_model (SD3Cond) .clip_l / .clip_g / .t5xxl, each with .transformer (HF-style names).
    """
    if family == "sd3":
        return sd3_text_encoder_roots(sd_model)
    if family == "sdxl":
        roots = []
        for emb in getattr(getattr(sd_model, "conditioner", None), "embedders", []):
            inner = _unwrap(emb)
            if isinstance(getattr(inner, "transformer", None), torch.nn.Module):
                roots.append(("te1", inner.transformer))
            elif isinstance(getattr(inner, "model", None), torch.nn.Module):
                roots.append(("te2", inner.model))
        return roots
    cond = _unwrap(getattr(sd_model, "cond_stage_model", None))
    for attr in ("transformer", "model"):
        root = getattr(cond, attr, None)
        if isinstance(root, torch.nn.Module):
            return [("te", root)]
    return []


def sd3_text_encoder_roots(sd_model: Any) -> list[tuple[str, torch.nn.Module]]:
    cond = _unwrap(getattr(sd_model, "cond_stage_model", None))
    roots = []
    for prefix, attr in (("te1", "clip_l"), ("te2", "clip_g"), ("te3", "t5xxl")):  # t5xxl is None when disabled
        root = getattr(getattr(cond, attr, None), "transformer", None)
        if isinstance(root, torch.nn.Module):
            roots.append((prefix, root))
    return roots


def unet_root(sd_model: Any) -> torch.nn.Module | None:
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


class WebUIHost:
    name = "webui"

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
    def notify(self, message: str, p: Any = None, show: bool = True) -> None:
        _log(message)
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
        """A setting, also before/without the settings UI (api-only mode never registers them)."""
        if default is None:
            default = DEFAULTS.get(key)
        return getattr(shared.opts, key, default)

    # training hooks: training on the WebUI's model lives in hosts/webui_training.py ------------
    def encode_text(self, prompts: list[str]) -> Any:
        raise NotImplementedError("text encoding for training is not implemented yet")

    def vae_encode(self, images: Any) -> Any:
        raise NotImplementedError("VAE encoding for training is not implemented yet")

    def vae_decode(self, latents: Any) -> Any:
        raise NotImplementedError("VAE decoding for training is not implemented yet")


def use_original_torch_load() -> None:
    """.pt/.ckpt LoRAs: modules/safe.py replaces torch.load with a checker that refuses current torch's
    zip files; fileio reads them with the original loader it keeps, always with weights_only=True."""
    from modules import safe
    original = getattr(safe, "unsafe_torch_load", None)
    if callable(original):
        fileio.use_torch_load(original)


# -- the built-in Lora extension ---------------------------------------------------------------


def builtin_lora_active() -> bool:
    """Whether the WebUI's own Lora extension (extensions-builtin/Lora) is loaded."""
    try:
        from modules import extensions
        return any(ext.is_builtin and ext.canonical_name == "lora" for ext in extensions.active())
    except Exception:  # very old or unusual WebUI: fall back to its module being imported
        return builtin_networks_module() is not None


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


# -- WebUI classes -------------------------------------------------------------------------------


class LoraNetwork(extra_networks.ExtraNetwork):
    """Handler of ``<lora:...>`` and ``<lyco:...>`` tokens."""

    def __init__(self, workshop: "Workshop"):
        super().__init__(NETWORK_NAME)
        self.workshop = workshop

    def activate(self, p, params_list):
        if self.workshop.hand_to_builtin(p, params_list):
            return
        self.workshop.activate(p, [params.items for params in params_list])

    def deactivate(self, p):
        self.workshop.builtin_deactivate(p)
        self.workshop.deactivate(p)


class LoraPage(ui_extra_networks.ExtraNetworksPage):
    """The "Lora" tab of Extra Networks: cards with preview, family badge, notes and metadata."""

    def __init__(self, workshop: "Workshop"):
        super().__init__(PAGE_TITLE)
        self.workshop = workshop

    def refresh(self):
        self.workshop.library.refresh()

    def list_items(self):
        # a snapshot (refresh may swap the list); training state files sit beside LoRAs but are not ones
        entries = list(self.workshop.library.entries)
        self.workshop.fits.prune({e.path for e in entries})
        names = cards.display_names(entries)
        for index, entry in enumerate(entries):
            yield self._item(entry, names[entry.relname], index)

    def create_item(self, name, index=None, enable_filter=True):
        try:
            entry = self.workshop.library.resolve(name)
        except LookupError:
            return None
        return self._item(entry, name, index)

    def allowed_directories_for_previews(self):
        return [str(r) for r in self.workshop.library.roots]

    def create_user_metadata_editor(self, ui, tabname):
        return LoraMetadataEditor(ui, tabname, self)

    def _description(self, entry, base: str) -> str | None:
        """The notes' description; an unreadable file's error goes first (escaped: cards insert it as HTML)."""
        text = self.find_description(base)
        if not entry.header_error:
            return text
        error = f'<span class="lora-workshop-error">{html.escape(entry.header_error)}</span>'
        return error + (f"<br>{text}" if text else "")

    def _item(self, entry, name: str, index) -> dict:
        ws = self.workshop
        filename = str(entry.path)
        base = os.path.splitext(filename)[0]
        metadata = lora_metadata.decoded_metadata(entry.metadata)
        fam = cards.card_family(entry, ws.runtime.model_map, ws.fits)
        item = {
            "name": name,
            "filename": filename,
            "shorthash": (entry.known_hash() or "")[:12],
            "preview": self.find_preview(base) or self.find_embedded_preview(base, name, metadata),
            "description": self._description(entry, base),
            "search_terms": cards.card_search_terms(entry),
            "local_preview": f"{base}.{shared.opts.samples_format}",
            "metadata": metadata,
            # sort keys become data-sort-* attributes on the card: style.css draws the badge from them
            "sort_keys": {"default": index if index is not None else 0, **self.get_sort_keys(filename),
                          **fam.sort_keys()},
            "sd_version": families.display(fam.family, unknown="Unknown"),
        }
        self.read_user_metadata(item)
        token_name = prompt_name(ws.library, entry,
                                         prefer_filename=ws.host.option("lora_preferred_name", "") == "Filename")
        prompt, negative = cards.card_prompts(token_name, item["user_metadata"], ws.default_weight())
        item["prompt"] = ui_extra_networks.quote_js(prompt)
        item["negative_prompt"] = ui_extra_networks.quote_js(negative)
        return item


class LoraMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    """Edits the ``<file>.json`` notes the built-in uses (same keys, other keys preserved)."""

    def save_lora_user_metadata(self, name, desc, activation_text, preferred_weight, negative_text, notes):
        user_metadata = self.get_user_metadata(name)
        user_metadata["description"] = desc
        user_metadata["activation text"] = activation_text
        user_metadata["preferred weight"] = preferred_weight
        user_metadata["negative text"] = negative_text
        user_metadata["notes"] = notes
        self.write_user_metadata(name, user_metadata)

    def get_metadata_table(self, name):
        table = list(super().get_metadata_table(name))
        item = self.page.items.get(name, {})
        metadata = item.get("metadata") or {}
        table.append(("Family:", html.escape(item.get("sd_version", "Unknown"))))
        # metadata comes from the file: escape it, the WebUI puts table cells into HTML as they are
        table += [(html.escape(label) + ":", html.escape(text)) for label, text in lora_metadata.metadata_summary(metadata)]
        tags = lora_metadata.tag_frequency(metadata, top=24)
        if tags:
            table.append(("Top tags:", html.escape(", ".join(f"{t} ({n})" for t, n in tags))))
        return table

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        values = super().put_values_into_components(name)
        try:
            weight = float(user_metadata.get("preferred weight") or 0.0)
        except (TypeError, ValueError):
            weight = 0.0
        return [*values[0:5], user_metadata.get("activation text", ""), weight, user_metadata.get("negative text", "")]

    def create_editor(self):
        import gradio as gr  # only in the real WebUI

        self.create_default_editor_elems()
        self.edit_activation_text = gr.Textbox(label="Activation text", info="added to the prompt with the LoRA")
        self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="0 = the default weight",
                                                 minimum=0.0, maximum=2.0, step=0.01)
        self.edit_negative_text = gr.Textbox(label="Negative prompt", info="added to the negative prompt")
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.create_default_buttons()
        self.button_edit.click(
            fn=self.put_values_into_components, inputs=[self.edit_name_input],
            outputs=[self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                     self.edit_activation_text, self.slider_preferred_weight, self.edit_negative_text],
        ).then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        self.setup_save_handler(self.button_save, self.save_lora_user_metadata,
                                [self.edit_description, self.edit_activation_text, self.slider_preferred_weight,
                                 self.edit_negative_text, self.edit_notes])


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
                               follow_outside_links=bool(self.host.option(OPT_OUTSIDE_LINKS)))
        self.runtime = Runtime(self.library)
        self.fits = FitCache()  # what cards of files that name no family say about the loaded model
        self.lbw_presets = blockweights.PresetSource(self.host.lbw_presets_files)
        self.lbw_element_presets = blockweights.PresetSource(
            lambda: self.host.lbw_presets_files(elementweights.ELEMENT_PRESETS_FILE, OPT_LBW_ELEMENT_PRESETS),
            elementweights.load_element_presets, elementweights.DEFAULT_ELEMENT_PRESETS)
        self.network = LoraNetwork(self)
        self.page = LoraPage(self)
        self.builtin = BuiltinHandoff(self)
        self._warned: set[str] = set()
        self._ui_claim_pending = False

    # settings -----------------------------------------------------------------------------------
    def _cache_bytes(self) -> int:
        try:
            mb = float(self.host.option(OPT_CACHE_MB))
        except (TypeError, ValueError):
            mb = DEFAULTS[OPT_CACHE_MB]
        return max(0, int(mb)) << 20

    def default_weight(self) -> float:
        try:
            return float(self.host.option(OPT_DEFAULT_WEIGHT))
        except (TypeError, ValueError):
            return DEFAULTS[OPT_DEFAULT_WEIGHT]

    def api_dataset_roots(self) -> list[Path]:
        """Folders whose datasets API requests may read: the WebUI's data folder and the listed ones."""
        listed = str(self.host.option(OPT_DATASET_ROOTS) or "")
        return [Path(paths.data_path)] + [Path(x.strip()).expanduser() for x in listed.split(",") if x.strip()]

    def apply_cache_setting(self) -> None:
        self.library.set_cache_bytes(self._cache_bytes())

    def apply_links_setting(self) -> None:
        self.library.follow_outside_links = bool(self.host.option(OPT_OUTSIDE_LINKS))
        self.library.refresh()

    def register_settings(self) -> None:
        """on_ui_settings: our own section; names are prefixed so they never clash with lora_*."""
        try:
            from gradio import Radio as radio, Slider as slider
        except ImportError:  # no gradio (tests, api-only tooling): the WebUI picks a field by type
            radio = slider = None
        add = shared.opts.add_option
        add(OPT_CACHE_MB, shared.OptionInfo(
            DEFAULTS[OPT_CACHE_MB], "Memory for parsed LoRA files (MB)", slider,
            {"minimum": 0, "maximum": 16384, "step": 64} if slider else None,
            onchange=self.apply_cache_setting, section=SECTION,
        ).info("least recently used files are dropped beyond this; the newest one is always kept"))
        add(OPT_DEFAULT_WEIGHT, shared.OptionInfo(
            DEFAULTS[OPT_DEFAULT_WEIGHT], "Default weight for <lora:name> without a weight", slider,
            {"minimum": -2.0, "maximum": 2.0, "step": 0.05} if slider else None, section=SECTION,
        ).info("also used by cards that have no preferred weight"))
        add(OPT_RESTORE_AFTER, shared.OptionInfo(
            DEFAULTS[OPT_RESTORE_AFTER], "Restore the model's weights after every generation", section=SECTION,
        ).info("off: LoRAs stay merged until the next generation needs other ones, like the built-in Lora"))
        add(OPT_SHOW_WARNINGS, shared.OptionInfo(
            DEFAULTS[OPT_SHOW_WARNINGS], "Show LoRA warnings in the generation info", section=SECTION,
        ).info("they are always printed to the console"))
        add(OPT_DATASET_ROOTS, shared.OptionInfo(
            DEFAULTS[OPT_DATASET_ROOTS], "Dataset folders that training requests over the API may read",
            section=SECTION,
        ).info("comma-separated; the WebUI's data folder is always allowed; the tab is not limited"))
        add(OPT_BUILTIN_DORA, shared.OptionInfo(
            DEFAULTS[OPT_BUILTIN_DORA], "Built-in-compatible DoRA", section=SECTION,
        ).info("merge DoRA files the way the built-in Lora does, to reproduce its images; "
               "off: LyCORIS's definition, which its trainers use"))
        add(OPT_OUTSIDE_LINKS, shared.OptionInfo(
            DEFAULTS[OPT_OUTSIDE_LINKS], "Index files that symlinks in the LoRA folder point to outside it",
            onchange=self.apply_links_setting, section=SECTION,
        ).info("for folders linked in on purpose; whatever such a link points to is then listed, hashed and "
               "served over the API"))
        add(OPT_LBW_PRESETS, shared.OptionInfo(
            DEFAULTS[OPT_LBW_PRESETS], "Block-weight presets file (lbwpresets.txt) for lbw=NAME", section=SECTION,
        ).info(f"empty: the one of LoRA Block Weight (extensions/{LBW_FOLDER}/scripts/), if installed"))
        add(OPT_LBW_ELEMENT_PRESETS, shared.OptionInfo(
            DEFAULTS[OPT_LBW_ELEMENT_PRESETS], "Element-weight presets file (elempresets.txt) for lbwe=NAME",
            section=SECTION,
        ).info(f"empty: the one of LoRA Block Weight (extensions/{LBW_FOLDER}/scripts/), if installed"))
        add(OPT_SCHEDULE_HIRES, shared.OptionInfo(
            DEFAULTS[OPT_SCHEDULE_HIRES], "start=/stop= also apply to the hires pass, counting its own steps",
            section=SECTION,
        ).info("off: the hires pass runs such LoRAs at their weight throughout, as LoRA Block Weight does"))
        add(OPT_TRAIN_PRIORITY, shared.OptionInfo(
            DEFAULTS[OPT_TRAIN_PRIORITY], "While a LoRA trains", radio,
            {"choices": ["Generation first", "Training only"]} if radio else None, section=SECTION,
        ).info("generation first: a txt2img/img2img (or other queued work) runs between two training steps, "
               "and <lora:NAME@live> applies the weights trained so far; training only: it waits until the job ends"))
        add(OPT_TRAIN_YIELD_SECONDS, shared.OptionInfo(
            DEFAULTS[OPT_TRAIN_YIELD_SECONDS], "Training time between chances for a waiting generation (s)", slider,
            {"minimum": 0.0, "maximum": 60.0, "step": 0.5} if slider else None, section=SECTION,
        ).info("0: at every step boundary; a generation waits at most this long plus one step"))

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
        if getattr(p, "is_hr_pass", False) and not self.host.option(OPT_SCHEDULE_HIRES):
            # LBW's step ranges are used up by the first pass; its hires pass has the LoRA at full weight
            requests = [r.without_schedule() if r.scheduled else r for r in requests]
        if not requests and not messages and not self.runtime.active:
            return ActivationResult()  # the common no-LoRA generation: nothing to build or restore
        self._check_builtin_idle()
        self.runtime.dora_mode = "webui" if self.host.option(OPT_BUILTIN_DORA) else "lycoris"
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
        self._write_hashes(p, res)
        self._write_live(p, res)
        show = bool(self.host.option(OPT_SHOW_WARNINGS))
        for msg in dict.fromkeys(res.messages):
            self.host.notify(msg, p, show=show)
        return res

    def before_generation(self) -> None:
        """scripts.process, before the first activation of a generation: our handler is the one, and no
        start=/stop= hooks of an earlier generation remain (the WebUI skips deactivate when one fails)."""
        self.claim()
        self.runtime.drop_schedules()

    def deactivate(self, p: Any) -> None:
        if self.host.option(OPT_RESTORE_AFTER):
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
        if not self.host.option("lora_add_hashes_to_infotext", True):  # the built-in's switch, if present
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
            _log(message)

    # other callbacks -----------------------------------------------------------------------------------
    def model_loaded(self, sd_model: Any) -> None:
        """A checkpoint was (re)loaded: new map; the previous model's backups are restored or dropped."""
        self.host.forget_model()
        mm = self.host.model_map(sd_model)
        self.runtime.set_model(mm)

    def infotext_pasted(self, infotext: str, params: dict) -> None:
        value = params.get(HASHES_KEY)
        if not value:
            return
        for key in ("Prompt", "Negative prompt", "Hires prompt", "Hires negative prompt"):
            if isinstance(params.get(key), str):
                params[key] = paste_rename(params[key], str(value), self.library)


_workshop: Workshop | None = None
_workshop_lock = threading.Lock()


def get_workshop() -> Workshop:
    global _workshop
    with _workshop_lock:
        if _workshop is None:
            _workshop = Workshop()
        return _workshop


def api_auth_dependencies(app: Any) -> list:
    """Dependencies enforcing --api-auth on our routes.

    Reuses the WebUI's own ``Api.auth`` when an Api object was created (--api / --nowebui):
    it is reachable as the bound dependency of its routes.  Otherwise the same check is
    rebuilt from cmd_opts.api_auth.
    """
    from fastapi import Depends

    from ..api import basic_auth

    api_auth = getattr(shared.cmd_opts, "api_auth", None)
    if not api_auth:
        return []
    for route in getattr(getattr(app, "router", None), "routes", []):
        dependant = getattr(route, "dependant", None)
        for dep in getattr(dependant, "dependencies", []) or []:
            call = getattr(dep, "call", None)
            owner = getattr(call, "__self__", None)
            if getattr(call, "__name__", "") == "auth" and isinstance(getattr(owner, "credentials", None), dict):
                return [Depends(call)]
    return [Depends(basic_auth(api_auth))]


def add_api_routes(app: Any, workshop: Workshop) -> list[str]:
    from ..api import add_routes
    from . import webui_tools, webui_training
    added = add_routes(app, lambda: workshop.library, dependencies=api_auth_dependencies(app),
                       builtin_compatible=not builtin_lora_active())
    return added + webui_training.add_api_routes(app, workshop) + webui_tools.add_api_routes(app, workshop)
