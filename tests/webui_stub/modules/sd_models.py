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


# -- loading (what a checkpoint or precision change calls; the stub records instead of loading) ---------

loads: list = []  # test hook: the checkpoint files reload_model_weights would have loaded


def select_checkpoint():
    """The checkpoint the setting names, else the first one listed."""
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    if not checkpoints_list:
        raise FileNotFoundError("No checkpoints found")
    return next(iter(checkpoints_list.values()))


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Runs before every generation in the WebUI and loads nothing unless another checkpoint is wanted."""
    sd_model = sd_model or shared.sd_model
    info = info or select_checkpoint()
    if sd_model is not None and getattr(sd_model, "sd_model_checkpoint", None) == info.filename and not forced_reload:
        return sd_model
    loads.append(info.filename)
    return sd_model


def unload_model_weights(sd_model=None, info=None):
    loads.append(None)
