"""LoRA Workshop command-line options, added by the WebUI before it parses the command line.

``--lora-dir`` belongs to the built-in Lora extension.  User extensions' preload() runs
*before* the built-in ones, and argparse refuses a second ``--lora-dir`` — which would abort
the built-in's preload before it adds its other option (``--lyco-dir-backcompat``) and
break it.  So we add ``--lora-dir`` only when nobody has added it and no built-in preload
is going to.
"""
import os
from pathlib import Path

BUILTIN_PRELOAD = os.path.join("Lora", "preload.py")


def _absolute(path: str) -> str:
    return str(Path(path).absolute())


def preload(parser):
    if "--lora-dir" in getattr(parser, "_option_string_actions", {}):
        return
    from modules import paths_internal  # importable before any dependency is installed

    if os.path.isfile(os.path.join(paths_internal.extensions_builtin_dir, BUILTIN_PRELOAD)):
        return  # the built-in adds it right after us
    parser.add_argument("--lora-dir", type=getattr(paths_internal, "normalized_filepath", _absolute),
                        default=os.path.join(paths_internal.models_path, "Lora"),
                        help="Path to directory with Lora networks.")
