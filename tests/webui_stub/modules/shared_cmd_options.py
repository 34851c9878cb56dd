"""Stub of modules/shared_cmd_options.py (WebUI v1.10.1): the parsed command line.

The real one parses cmd_args.parser after every extension's preload(); tests set attributes.
"""
import argparse
import os

from modules import paths_internal

cmd_opts = argparse.Namespace(
    lora_dir=os.path.join(paths_internal.models_path, "Lora"),
    lyco_dir_backcompat=os.path.join(paths_internal.models_path, "LyCORIS"),
    api=False,
    api_auth=None,
    nowebui=False,
    disable_all_extensions=False,
    disable_extra_extensions=False,
    freeze_settings=False,
    hide_ui_dir_config=False,
    skip_install=False,
    lowvram=False,
    medvram=False,
    medvram_sdxl=False,
)
