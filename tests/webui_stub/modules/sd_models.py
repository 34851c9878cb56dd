"""Stub of modules/sd_models.py (WebUI v1.10.1): the checkpoint list and its folder, nothing that loads.

What extensions read of it: ``model_path`` (models/Stable-diffusion), ``checkpoints_list`` (title ->
CheckpointInfo), ``checkpoint_aliases`` (every name a checkpoint answers to -> CheckpointInfo) and
``list_models()``, which rescans the folder (and ``--ckpt-dir``) as the UI's refresh button does.
A title is "NAME [SHORTHASH]" once the sha256 is known, else the name (the path below the folder).
"""
import os

from modules import paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list: dict = {}
checkpoint_aliases: dict = {}


class CheckpointInfo:
    def __init__(self, filename: str):
        self.filename = os.path.abspath(filename)
        folder = next((d for d in (getattr(shared.cmd_opts, "ckpt_dir", None), model_path)
                       if d and self.filename.startswith(os.path.abspath(d) + os.sep)), None)
        self.name = os.path.relpath(self.filename, folder) if folder else os.path.basename(self.filename)
        self.name_for_extra = os.path.splitext(os.path.basename(self.filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = self.name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.title, self.name, self.name_for_extra]

    def register(self) -> None:
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self


def list_models() -> None:
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folders = [model_path] + ([shared.cmd_opts.ckpt_dir] if getattr(shared.cmd_opts, "ckpt_dir", None) else [])
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for root, _, files in os.walk(folder):
            for f in sorted(files):
                if f.endswith((".ckpt", ".safetensors")):
                    CheckpointInfo(os.path.join(root, f)).register()
