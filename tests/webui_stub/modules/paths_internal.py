"""Stub of modules/paths_internal.py (WebUI v1.10.1): folders, importable before any dependency."""
import os
from pathlib import Path

normalized_filepath = lambda filepath: str(Path(filepath).absolute())  # noqa: E731  (same shape as the WebUI's)

cwd = os.getcwd()
modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.path.dirname(modules_path)
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
