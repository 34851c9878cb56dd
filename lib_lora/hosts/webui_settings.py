"""LoRA Workshop's settings in the WebUI (Settings → LoRA Workshop): names, defaults, registration.

A leaf: every ``hosts/webui*.py`` file reads its option names here.  Values are read through
``WebUIHost.option``, which falls back to ``DEFAULTS`` (api-only mode never registers settings).
"""
from __future__ import annotations

from typing import Any, Callable

from modules import shared

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
TRAIN_PRIORITIES = ("Generation first", "Training only")  # OPT_TRAIN_PRIORITY's choices
DEFAULTS: dict[str, Any] = {OPT_CACHE_MB: 2048, OPT_DEFAULT_WEIGHT: 1.0, OPT_RESTORE_AFTER: False,
                            OPT_SHOW_WARNINGS: True, OPT_DATASET_ROOTS: "", OPT_BUILTIN_DORA: False,
                            OPT_OUTSIDE_LINKS: False, OPT_LBW_PRESETS: "", OPT_SCHEDULE_HIRES: False,
                            OPT_LBW_ELEMENT_PRESETS: "",
                            OPT_TRAIN_PRIORITY: TRAIN_PRIORITIES[0], OPT_TRAIN_YIELD_SECONDS: 1.0}
LBW_FOLDER = "sd-webui-lora-block-weight"


def register(on_cache_change: Callable[[], None], on_links_change: Callable[[], None],
             builtin_active: bool = True) -> None:
    """on_ui_settings: our own section; names are prefixed so they never clash with lora_*.  With the
    built-in Lora disabled, the settings of its that we follow are registered here under its own names (so
    values saved while it was enabled still apply, and the user still has a switch for each)."""
    try:
        from gradio import CheckboxGroup as checkboxes, Radio as radio, Slider as slider
    except ImportError:  # no gradio (tests, api-only tooling): the WebUI picks a field by type
        checkboxes = radio = slider = None
    add = shared.opts.add_option
    if not builtin_active:
        _register_builtins(add, radio, checkboxes)
    add(OPT_CACHE_MB, shared.OptionInfo(
        DEFAULTS[OPT_CACHE_MB], "Memory for parsed LoRA files (MB)", slider,
        {"minimum": 0, "maximum": 16384, "step": 64} if slider else None,
        onchange=on_cache_change, section=SECTION,
    ).info("least recently used files are dropped beyond this; the newest one is always kept"))
    add(OPT_DEFAULT_WEIGHT, shared.OptionInfo(
        DEFAULTS[OPT_DEFAULT_WEIGHT], "Default weight for <lora:name> without a weight", slider,
        {"minimum": -2.0, "maximum": 2.0, "step": 0.05} if slider else None, section=SECTION,
    ).info("cards without a preferred weight insert the WebUI's \"Default multiplier for extra networks\" "
           "instead, as the built-in Lora's do"))
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
        onchange=on_links_change, section=SECTION,
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
        {"choices": list(TRAIN_PRIORITIES)} if radio else None, section=SECTION,
    ).info("generation first: a txt2img/img2img (or other queued work) runs between two training steps, "
           "and <lora:NAME@live> applies the weights trained so far; training only: it waits until the job ends"))
    add(OPT_TRAIN_YIELD_SECONDS, shared.OptionInfo(
        DEFAULTS[OPT_TRAIN_YIELD_SECONDS], "Training time between chances for a waiting generation (s)", slider,
        {"minimum": 0.0, "maximum": 60.0, "step": 0.5} if slider else None, section=SECTION,
    ).info("0: at every step boundary; a generation waits at most this long plus one step"))


# The built-in Lora's settings we follow, with its defaults and choices (registered only while it is disabled).
BUILTIN_DEFAULTS: dict[str, Any] = {
    "lora_preferred_name": "Alias from file", "lora_add_hashes_to_infotext": True,
    "lora_bundled_ti_to_infotext": True, "lora_show_all": False, "lora_hide_unknown_for_versions": [],
    "lora_not_found_gradio_warning": False}


def _register_builtins(add: Callable, radio: Any, checkboxes: Any) -> None:
    d = BUILTIN_DEFAULTS
    add("lora_preferred_name", shared.OptionInfo(
        d["lora_preferred_name"], "Cards and pasted infotexts name a LoRA by", radio,
        {"choices": ["Alias from file", "Filename"]} if radio else None, section=SECTION))
    add("lora_add_hashes_to_infotext", shared.OptionInfo(
        d["lora_add_hashes_to_infotext"], "Write \"Lora hashes\" into the infotext", section=SECTION))
    add("lora_bundled_ti_to_infotext", shared.OptionInfo(
        d["lora_bundled_ti_to_infotext"], "Give a bundled embedding's LoRA name as its \"TI hashes\" entry",
        section=SECTION))
    add("lora_show_all", shared.OptionInfo(
        d["lora_show_all"], "Show cards of every model family", section=SECTION,
    ).info("off: cards made for another family than the loaded model's are hidden"))
    add("lora_hide_unknown_for_versions", shared.OptionInfo(
        d["lora_hide_unknown_for_versions"], "Hide cards of unknown family while one of these is loaded", checkboxes,
        {"choices": ["SD1", "SD2", "SDXL"]} if checkboxes else None, section=SECTION))
    add("lora_not_found_gradio_warning", shared.OptionInfo(
        d["lora_not_found_gradio_warning"], "Pop up a warning in the browser when a LoRA is not found",
        section=SECTION))
