"""Stub of modules/shared.py (WebUI v1.10.1).

In the WebUI ``sd_model`` is a property that loads the model on first access; here it is
a plain attribute the tests assign.
"""
from modules import options, shared_cmd_options, shared_state, shared_total_tqdm

cmd_opts = shared_cmd_options.cmd_opts

OptionInfo = options.OptionInfo
options_section = options.options_section

options_templates: dict = {}
opts: options.Options = options.Options(options_templates, set())
opts.add_option("samples_format", OptionInfo("png", "File format for images"))
opts.add_option("extra_networks_default_multiplier", OptionInfo(1.0, "Default multiplier for extra networks"))
# read by the embedders (modules/sd_hijack_clip.py): SD1's layer from the end, and whether SDXL's CLIP-L uses it
opts.add_option("CLIP_stop_at_last_layers", OptionInfo(1, "Clip skip"))
opts.add_option("sdxl_clip_l_skip", OptionInfo(False, "Clip skip SDXL"))

sd_model = None
state = shared_state.State()
total_tqdm = shared_total_tqdm.TotalTQDM()
parallel_processing_allowed = True
