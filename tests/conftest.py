import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "tests" / "webui_stub"
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch

# Tiny models gain nothing from threads, and CI has two cores shared with pytest itself.
torch.set_num_threads(1)


def pytest_addoption(parser) -> None:
    from fuzz.runner import DEFAULT_CASES

    parser.addoption("--cases", type=int, default=DEFAULT_CASES, help="number of generated files for tests/fuzz")


# -- the stand-in WebUI (tests/webui_stub), shared by the tests of the WebUI glue --------------------------


class StandinWebUI:
    """The stand-in WebUI about to load LoRA Workshop: its folders under ``tmp`` (models/Lora,
    models/Stable-diffusion), fresh settings, ``shared.state``, queue lock and callbacks, no model
    loaded, no --api-auth; every change goes through ``mp`` and is undone after the test.
    ``load_script`` loads our script the way the WebUI loads an extension's; ``start`` does that and serves
    the app (with --api)."""

    def __init__(self, tmp: Path, monkeypatch):
        from modules import (call_queue, extensions, extra_networks, fifo_lock, hashes, paths, paths_internal,
                             script_callbacks, sd_hijack, sd_models, shared, shared_state, ui_extra_networks)
        from modules.options import OptionInfo, Options

        from lib_lora import fileio
        from lib_lora.hosts import webui as host
        from lib_lora.hosts import webui_tools, webui_training

        mp = self.mp = monkeypatch
        self.tmp = tmp
        self.lora_dir = tmp / "models" / "Lora"
        self.ckpt_dir = tmp / "models" / "Stable-diffusion"
        for d in (self.lora_dir, self.ckpt_dir):
            d.mkdir(parents=True)
        for mod in (paths_internal, paths):
            mp.setattr(mod, "models_path", str(tmp / "models"))
        mp.setattr(paths, "data_path", str(tmp))
        mp.setattr(hashes, "caches", {})   # the WebUI's hash cache starts empty, as in a new data folder
        mp.setattr(paths_internal, "extensions_builtin_dir", str(tmp / "extensions-builtin"))
        mp.setattr(shared.cmd_opts, "lora_dir", str(self.lora_dir))
        mp.setattr(shared.cmd_opts, "lyco_dir_backcompat", str(tmp / "models" / "LyCORIS"))
        mp.setattr(shared.cmd_opts, "ckpt_dir", None, raising=False)
        mp.setattr(shared.cmd_opts, "api_auth", None)
        mp.setattr(shared, "opts", Options({}, set()))
        shared.opts.add_option("samples_format", OptionInfo("png"))
        shared.opts.add_option("extra_networks_default_multiplier", OptionInfo(1.0))
        shared.opts.add_option("CLIP_stop_at_last_layers", OptionInfo(1))  # the WebUI's Clip skip settings
        shared.opts.add_option("sdxl_clip_l_skip", OptionInfo(False))
        mp.setattr(shared, "state", shared_state.State())
        mp.setattr(shared, "sd_model", None)
        mp.setattr(call_queue, "queue_lock", fifo_lock.FIFOLock())
        mp.setattr(extensions, "extensions", [extensions.Extension("lora-workshop", str(ROOT))])
        mp.setattr(sd_models, "model_path", str(self.ckpt_dir))
        mp.setattr(sd_models, "checkpoints_list", {})
        mp.setattr(sd_models, "checkpoint_aliases", {})
        mp.setattr(host, "_workshop", None)
        for mod in (webui_training, webui_tools):
            mp.setattr(mod._runners, "current", None)
        mp.setattr(fileio, "_torch_load", None)  # the script registers the WebUI's loader again
        mp.delitem(sys.modules, "networks", raising=False)
        extra_networks.initialize()
        ui_extra_networks.initialize()
        ui_extra_networks.allowed_dirs.clear()
        script_callbacks.clear_callbacks()
        sd_hijack.model_hijack.clear_comments()
        mp.setattr(sd_hijack.model_hijack, "embedding_db", sd_hijack.EmbeddingDatabase())
        self.script = None

    def load_script(self):
        """What the WebUI's scripts.load_scripts does for our one script file."""
        from modules import paths, script_loading, scripts

        syspath = sys.path
        sys.path = [str(ROOT)] + sys.path
        scripts.current_basedir = str(ROOT)
        try:
            self.script = script_loading.load_module(str(ROOT / "scripts" / "lora_workshop.py"))
        finally:
            sys.path = syspath
            scripts.current_basedir = paths.script_path
        return self.script

    def start(self, auth: str | None = None, components: tuple[str, ...] = ()):
        """List the checkpoints, load scripts/lora_workshop.py, add the --api routes, run the UI callbacks
        (``before_component`` for the elem_ids in ``components``) and ``app_started``; a TestClient of the app.
        ``auth``: --api-auth ("user:password")."""
        from fastapi import FastAPI
        from fastapi.testclient import TestClient
        from modules import call_queue, script_callbacks, sd_models, shared
        from modules.api.api import Api

        if auth:
            self.mp.setattr(shared.cmd_opts, "api_auth", auth)
        sd_models.list_models()  # the WebUI lists its checkpoints before extensions load
        self.app = FastAPI()
        self.load_script()
        self.api = Api(self.app, call_queue.queue_lock)   # --api: /sdapi/v1/progress, /interrupt
        script_callbacks.before_ui_callback()
        for elem_id in components:
            script_callbacks.before_component_callback(object(), elem_id=elem_id)
        script_callbacks.app_started_callback(None, self.app)
        self.client = TestClient(self.app)
        return self.client


@pytest.fixture
def standin_webui(tmp_path, monkeypatch) -> StandinWebUI:
    """A ``StandinWebUI`` in ``tmp_path`` (tests/webui_stub as the WebUI's ``modules``)."""
    pytest.importorskip("fastapi")
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    return StandinWebUI(tmp_path, monkeypatch)


@pytest.fixture
def gradio_standin(monkeypatch):
    """tests/gradio_standin.py installed as ``gradio`` for the test (the WebUI's gradio is not installable here)."""
    import gradio_standin as standin

    monkeypatch.setitem(sys.modules, "gradio", standin)
    return standin


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(checkpoint file, dataset folder): a tiny SD1 single-file checkpoint and a 4-image kohya dataset
    (``2_zkx``), what ``python -m lib_lora train`` reads."""
    from lib_lora.hosts.cli.checkpoint import Checkpoint, save_checkpoint
    from tiny_models import build_sd1
    from train_support import make_dataset, tiny_vae

    root = tmp_path_factory.mktemp("tiny_checkpoint")
    tiny = build_sd1(seed=0)
    ck = Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae())
    return save_checkpoint(ck, root / "toy.safetensors", dtype=torch.float32), make_dataset(root / "data")


@pytest.fixture(scope="module")
def vae():
    """The toy-width diffusers VAE the training tests encode with (seeded, so every module gets the same)."""
    from train_support import tiny_vae
    return tiny_vae()


# -- training inside the stand-in WebUI (tests/webui_training_support.py) ----------------------------------


@pytest.fixture(scope="module")
def sd_model():
    """A tiny SD1 laid out like the WebUI's ``shared.sd_model`` (``TinySD1``)."""
    from webui_training_support import TinySD1
    return TinySD1()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A kohya dataset folder of 4 images (``1_zkx``); a module that needs another defines its own ``data``."""
    from train_support import make_dataset
    return make_dataset(tmp_path_factory.mktemp("data"), n=4, repeats=1)


@pytest.fixture
def training_webui(standin_webui, tmp_path_factory, sd_model):
    """The stand-in WebUI with ``sd_model`` loaded (``TrainingWebUI``); its jobs are stopped afterwards."""
    from modules import shared
    from modules.options import OptionInfo

    from lib_lora.hosts import webui_settings as settings
    from webui_training_support import TrainingWebUI

    w = TrainingWebUI(standin_webui, sd_model)
    # the datasets of these tests live in pytest's temp folders, outside the WebUI's data folder
    shared.opts.add_option(settings.OPT_DATASET_ROOTS, OptionInfo(str(tmp_path_factory.getbasetemp())))
    yield w
    w.cleanup()


# -- the WebUI glue's tiny SD1 (tests/webui_glue_support.py) -------------------------------------------------


@pytest.fixture(scope="module")
def sd1():
    """(a tiny SD1 laid out like the WebUI's ``shared.sd_model``, a copy of its state dict)."""
    from webui_glue_support import tiny_sd1
    model = tiny_sd1()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(sd1):
    """``sd1``'s model, put back to its saved state after the test."""
    m, snapshot = sd1
    yield m
    with torch.no_grad():  # undo whatever a test left merged
        for k, v in m.state_dict().items():
            v.copy_(snapshot[k])


@pytest.fixture
def webui(standin_webui):
    """The stand-in WebUI driven a step at a time (``webui_glue_support.WebUI``)."""
    from webui_glue_support import WebUI
    return WebUI(standin_webui)


@pytest.fixture
def sd1_map(model):
    from lib_lora.modelmap import ModelMap
    return ModelMap.build("sd1", model.model.diffusion_model, [("te", model.cond_stage_model.wrapped.transformer)])
