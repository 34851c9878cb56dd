"""LoRA Workshop — WebUI entry point: wires the WebUI's callbacks to lib_lora.hosts.webui (and its
routes and tab, which sit above it: webui_routes, webui_training).

Kept thin on purpose; the behaviour lives in lib_lora (testable without the WebUI).
The WebUI executes this file on start and on every "Reload UI".
"""
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _root not in sys.path:  # the WebUI adds the extension folder only while loading this file
    sys.path.insert(0, _root)

from modules import script_callbacks, scripts  # noqa: E402

from lib_lora.hosts import webui, webui_routes, webui_training  # noqa: E402

workshop = webui.get_workshop()


def on_before_ui():
    workshop.register()


def on_before_component(component, **kwargs):
    # The first component is created after *all* before_ui callbacks and before the Extra
    # Networks tabs copy the page list: the moment to undo a later registration by the built-in.
    workshop.claim_once_for_ui()


def on_app_started(demo, app):
    workshop.claim()
    added = webui_routes.add_api_routes(app, workshop)
    if added:
        print(f"[LoRA Workshop] API: {', '.join(added)}")


class LoraWorkshopScript(scripts.Script):
    """Invisible, always-on: right before each generation's activation, re-claims the <lora:> handler
    and drops step schedules an aborted generation may have left."""

    create_group = False

    def title(self):
        return "LoRA Workshop"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        workshop.before_generation()


script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_before_component(on_before_component)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_ui_settings(workshop.register_settings)
script_callbacks.on_model_loaded(workshop.model_loaded)
script_callbacks.on_infotext_pasted(workshop.infotext_pasted)
script_callbacks.on_script_unloaded(workshop.restore)
script_callbacks.on_cfg_denoiser(workshop.denoiser_step)
script_callbacks.on_ui_tabs(webui_training.ui_tabs)
