"""Stub of modules/sd_vae.py (WebUI v1.10.1): which VAE is loaded and which one the settings want."""
from dataclasses import dataclass

from modules import shared

loaded_vae_file = None   # None: the checkpoint's own VAE
unspecified = object()
loads: list = []         # test hook: the VAE files reload_vae_weights would have loaded


@dataclass
class VaeResolution:
    vae: str = None
    source: str = None
    resolved: bool = True

    def tuple(self):
        return self.vae, self.source


def resolve_vae(checkpoint_file) -> VaeResolution:
    """The VAE the ``sd_vae`` setting names ("Automatic"/"None": the checkpoint's own)."""
    setting = getattr(shared.opts, "sd_vae", "Automatic")
    if setting in ("Automatic", "None", None):
        return VaeResolution(None, "checkpoint")
    return VaeResolution(setting, "from settings")


def reload_vae_weights(sd_model=None, vae_file=unspecified):
    if vae_file is unspecified:
        vae_file = resolve_vae(None).vae
    if vae_file == loaded_vae_file:
        return
    loads.append(vae_file)
    return sd_model
