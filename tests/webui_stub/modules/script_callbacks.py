"""Stub of modules/script_callbacks.py (WebUI v1.10.1): registration and invocation of callbacks.

Ordering as in the WebUI when no metadata.ini order instructions or user priorities apply:
registration order, except ``before_ui`` and ``script_unloaded`` which run in reverse.
"""
from __future__ import annotations

import dataclasses
import inspect
import os

from modules import errors, extensions


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step              # shared.state.sampling_step when the denoiser runs
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: any
    name: str = "unnamed"


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_component=[],
    callbacks_after_component=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_on_reload=[],
    callbacks_cfg_denoiser=[],
)


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'
    extension = extensions.find_extension(filename)
    extension_name = extension.canonical_name if extension else 'base'
    callback_name = f"{extension_name}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f'/{name}'
    callbacks.append(ScriptCallback(filename, fun, callback_name))


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    return list(callback_map['callbacks_' + category] if unordered_callbacks is None else unordered_callbacks)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def _run(category, *args, reverse=False, **kwargs):
    callbacks = ordered_callbacks(category)
    for c in (reversed(callbacks) if reverse else callbacks):
        try:
            c.callback(*args, **kwargs)
        except Exception:
            errors.report(f"Error executing callback {category} for {c.script}", exc_info=True)


def app_started_callback(demo, app):
    _run('app_started', demo, app)


def model_loaded_callback(sd_model):
    _run('model_loaded', sd_model)


def ui_settings_callback():
    _run('ui_settings')


def ui_tabs_callback():
    """Each callback returns a list of (gradio Blocks, title, elem_id); the lists are concatenated."""
    res = []
    for c in ordered_callbacks('ui_tabs'):
        try:
            res += c.callback() or []
        except Exception:
            errors.report(f"Error executing callback ui_tabs_callback for {c.script}", exc_info=True)
    return res


def cfg_denoiser_callback(params: CFGDenoiserParams):
    """Called by CFGDenoiser.forward (every denoiser evaluation) before the UNet runs."""
    _run('cfg_denoiser', params)


def before_component_callback(component, **kwargs):
    _run('before_component', component, **kwargs)


def infotext_pasted_callback(infotext: str, params):
    _run('infotext_pasted', infotext, params)


def script_unloaded_callback():
    _run('script_unloaded', reverse=True)


def before_ui_callback():
    _run('before_ui', reverse=True)


def on_app_started(callback, *, name=None):
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map['callbacks_model_loaded'], callback, name=name, category='model_loaded')


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


def on_before_component(callback, *, name=None):
    add_callback(callback_map['callbacks_before_component'], callback, name=name, category='before_component')


def on_after_component(callback, *, name=None):
    add_callback(callback_map['callbacks_after_component'], callback, name=name, category='after_component')


def on_infotext_pasted(callback, *, name=None):
    add_callback(callback_map['callbacks_infotext_pasted'], callback, name=name, category='infotext_pasted')


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map['callbacks_script_unloaded'], callback, name=name, category='script_unloaded')


def on_cfg_denoiser(callback, *, name=None):
    add_callback(callback_map['callbacks_cfg_denoiser'], callback, name=name, category='cfg_denoiser')


def on_before_ui(callback, *, name=None):
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')


def on_before_reload(callback, *, name=None):
    add_callback(callback_map['callbacks_on_reload'], callback, name=name, category='on_reload')
