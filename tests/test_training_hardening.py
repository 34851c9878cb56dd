"""Training never overwrites what it does not own, never reads outside its roots, and refuses
bad values with one line naming the option (issue: hardening, training side)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from lib_lora import cli
from lib_lora.fileio import read_header, save_safetensors
from lib_lora.library import Library
from lib_lora.training import jobs
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.errors import RequestError
from lib_lora.training.host import TrainingHost
from lib_lora.training.network import NetworkConfig
from lib_lora.training import outputs
from lib_lora.training.options import OptionError
from lib_lora.training.outputs import check_output_name
from lib_lora.training.plan import make_plan
from lib_lora.training.request import build_request
from lib_lora.training.state import STATE_FORMAT, read_state_header
from lib_lora.training.trainer import Callbacks, Trainer
from tiny_models import build_sd1
from train_support import make_dataset, trainable

QUIET = Callbacks(log=lambda s: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=2, repeats=1)


def config(data: Path, out: Path, **kw) -> TrainConfig:
    ds = DatasetConfig(data, resolution=64, enable_buckets=False)
    base = dict(output_dir=out, output_name="t", max_train_steps=4, learning_rate=1e-3, save_precision="fp32",
                network=NetworkConfig(rank=2, alpha=2, train_text_encoder=False))
    base.update(kw)
    return TrainConfig(ds, **base)


def user_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({"x": torch.ones(2)}, path, {"ss_session_id": "someone-else"})
    return path.read_bytes()


# -- intermediate saves and resume -------------------------------------------------------------------


@pytest.mark.parametrize("existing", ["t-step00000002.safetensors", "t-step00000002-state.safetensors"])
def test_intermediate_names_are_checked_before_the_first_step(tmp_path, data, existing):
    out = tmp_path / "out"
    before = user_file(out / existing)
    cfg = config(data, out, save_every_n_steps=2, save_state=True)
    with pytest.raises(FileExistsError, match=existing.replace(".", r"\.")):
        make_plan(cfg)
    assert (out / existing).read_bytes() == before
    assert not (out / "t.safetensors").exists()


def test_saves_and_states_use_kohyas_names(tmp_path, data, vae):
    """2 images x 1 repeat at batch 1: 2 steps an epoch, so 6 steps are 3 epochs.  Epoch saves are
    NAME-000001, step saves NAME-step00000004, states take kohya's state-folder names plus
    .safetensors; ss_epoch is kohya's (a step save: the epoch it falls in counted from 0)."""
    out = tmp_path / "out"
    cfg = config(data, out, max_train_steps=6, save_every_n_steps=4, save_every_n_epochs=1, save_state=True)
    res = Trainer(trainable(build_sd1(seed=0), vae), make_plan(cfg), QUIET).run()
    loras = ["t-000001.safetensors", "t-step00000004.safetensors", "t-000002.safetensors", "t.safetensors"]
    assert [p.name for p in res.saved] == loras
    states = ["t-000001-state.safetensors", "t-step00000004-state.safetensors", "t-000002-state.safetensors",
              "t-state.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(loras + states)
    assert sorted(outputs.planned(cfg, 6, 2)) == sorted(out / n for n in loras + states)
    epochs_steps = [(read_header(out / n).metadata["ss_epoch"], read_header(out / n).metadata["ss_steps"])
                    for n in loras]
    assert epochs_steps == [("1", "2"), ("1", "4"), ("2", "4"), ("3", "6")]
    assert [read_state_header(out / n).step for n in states] == [2, 4, 4, 6]
    assert sorted(e.name for e in Library([out]).entries) == sorted(n[:-len(".safetensors")] for n in loras)


def test_overwrite_replaces_intermediate_files_when_asked(tmp_path, data, vae):
    out = tmp_path / "out"
    before = user_file(out / "t-step00000002.safetensors")
    cfg = config(data, out, save_every_n_steps=2, overwrite=True)
    Trainer(trainable(build_sd1(seed=0), vae), make_plan(cfg), QUIET).run()
    assert (out / "t-step00000002.safetensors").read_bytes() != before


def _stopped_run(data: Path, out: Path, vae) -> Path:
    """A run stopped at step 2 with state saved there; returns the state file."""
    def stop(p):
        if p.step == 2:
            tr.request_stop()
    tr = Trainer(trainable(build_sd1(seed=0), vae), make_plan(config(data, out, save_every_n_steps=2, save_state=True)),
                 Callbacks(on_progress=stop, log=lambda s: None))
    tr.run()
    state = out / "t-step00000002-state.safetensors"
    assert state.exists()
    return state


def test_resume_never_overwrites_an_unrelated_lora(tmp_path, data, vae):
    out = tmp_path / "out"
    state = _stopped_run(data, out, vae)
    before = user_file(out / "other.safetensors")
    req = build_request({"resume_from": state.name, "output_name": "other"}, out)
    assert not req.config.overwrite  # a resume is no licence to overwrite
    with pytest.raises(FileExistsError, match="other.safetensors"):
        make_plan(req.config, req.resume_from)
    assert (out / "other.safetensors").read_bytes() == before


def test_resume_continues_its_own_files(tmp_path, data, vae):
    out = tmp_path / "out"
    state = _stopped_run(data, out, vae)
    req = build_request({"resume_from": state.name}, out)
    plan = make_plan(req.config, req.resume_from)  # its own step-2 files exist: they are the run's
    res = Trainer(trainable(build_sd1(seed=0), vae), plan, QUIET).run()
    assert res.steps == 4 and (out / "t.safetensors").exists()


def test_a_run_leaves_its_config_and_plan_alone(tmp_path, data, vae):
    cfg = config(data, tmp_path / "out", max_train_steps=2, save_every_n_steps=1)
    before = dataclasses.asdict(cfg)
    plan = make_plan(cfg)
    res = Trainer(trainable(build_sd1(seed=0), vae), plan, QUIET).run()
    assert res.steps == 2 and len(res.saved) == 2
    assert dataclasses.asdict(cfg) == before and plan.config is cfg and plan.total_steps == 2


def test_stale_temp_files_of_our_outputs_are_swept(tmp_path, data):
    out = tmp_path / "out"
    out.mkdir()
    stale, fresh, foreign = (out / ".t.safetensors.abcd1234.tmp", out / ".t.safetensors.zzzz9999.tmp",
                             out / ".other.safetensors.abcd1234.tmp")
    for p in (stale, fresh, foreign):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(foreign, (old, old))
    make_plan(config(data, out), log=lambda s: None)
    assert not stale.exists()
    assert fresh.exists()   # might be a save in progress
    assert foreign.exists()  # not a file this run writes


# -- requests ------------------------------------------------------------------------------------------


def _state_file(path: Path, meta: dict[str, str]) -> Path:
    save_safetensors({"s.empty": torch.zeros(0)}, path, meta)
    return path


@pytest.mark.parametrize("meta", [
    {"format": STATE_FORMAT},                                   # no state key
    {"format": STATE_FORMAT, "state": "{not json"},
    {"format": STATE_FORMAT, "state": "[1, 2]"},
    {"format": STATE_FORMAT, "state": json.dumps({"__dict__": [["config", [1]]]})},
    {"format": STATE_FORMAT, "state": json.dumps({"__dict__": "x"})},
    {"format": STATE_FORMAT, "state": "[" * 100000 + "]" * 100000},
    {"format": "something else"},
])
def test_crafted_state_files_are_request_errors(tmp_path, data, meta):
    _state_file(tmp_path / "x.state.safetensors", meta)
    with pytest.raises(RequestError, match="resume_from"):
        build_request({"resume_from": "x.state.safetensors"}, tmp_path)


@pytest.mark.parametrize("body", [
    {"dataset": [1, 2]},
    {"dataset": "folder"},
    {"network": [1]},
    {"preset": [1, 2]},
    {"preset": {"a": 1}},
])
def test_malformed_request_parts_name_the_field(tmp_path, data, body):
    req = {"output_name": "x", "dataset": {"train_dir": str(data)}, **body}
    with pytest.raises(RequestError) as e:
        build_request(req, tmp_path)
    assert e.value.status == 400
    assert next(iter(body)) in str(e.value)


def test_api_datasets_must_lie_in_the_dataset_roots(tmp_path, data):
    allowed = tmp_path / "allowed"
    make_dataset(allowed / "set", n=1, repeats=1)
    (allowed / "link").symlink_to(data, target_is_directory=True)
    roots = [allowed]
    ok = build_request({"output_name": "x", "dataset": {"train_dir": str(allowed / "set")}}, tmp_path,
                            dataset_roots=roots)
    assert Path(ok.config.dataset.train_dir) == allowed / "set"
    for outside in (data, Path("/etc"), tmp_path / "missing", allowed / "link", allowed / ".." / "x"):
        with pytest.raises(RequestError, match="outside the dataset folders") as e:
            build_request({"output_name": "x", "dataset": {"train_dir": str(outside)}}, tmp_path,
                               dataset_roots=roots)
        assert "not found" not in str(e.value)  # refused before looking: nothing said about outside folders


def test_only_remote_requests_are_confined(tmp_path, data):
    class Host(TrainingHost):
        def output_dir(self):
            return tmp_path

        def dataset_roots(self):
            return [tmp_path / "nowhere"]

    runner = jobs.JobRunner(Host())
    body = {"output_name": "x", "dataset": {"train_dir": str(data), "resolution": 64, "enable_buckets": False}}
    summary, problems = runner.validate(body)  # the tab: the user's own folders
    assert summary["train_images"] == 2 and not problems
    with pytest.raises(RequestError, match="outside"):
        runner.validate(body, remote=True)


# -- option values -----------------------------------------------------------------------------------

_BAD = [
    (["--network-dim", "0"], "--network-dim"), (["--network-dim", "-4"], "--network-dim"),
    (["--learning-rate", "nan"], "--learning-rate"), (["--learning-rate", "inf"], "--learning-rate"),
    (["--learning-rate=-1e-4"], "--learning-rate"), (["--noise-offset", "nan"], "--noise-offset"),
    (["--network-alpha", "nan"], "--network-alpha"), (["--max-train-steps", "0"], "--max-train-steps"),
    (["--batch-size", "0"], "--batch-size"), (["--optimizer", "Bogus"], "--optimizer"),
    (["--save-every-n-steps", "-1"], "--save-every-n-steps"), (["--min-snr-gamma", "nan"], "--min-snr-gamma"),
    (["--network-dropout", "1.5"], "--network-dropout"), (["--conv-dim", "-1"], "--conv-dim"),
]
if importlib.util.find_spec("lion_pytorch") is None:
    _BAD.append((["--optimizer", "Lion"], "--optimizer"))


@pytest.mark.parametrize("extra,flag", _BAD)
def test_cli_train_refuses_bad_values_in_one_line(tmp_path, data, capsys, extra, flag):
    code = cli.main(["train", str(data), "--base", str(tmp_path / "never-read.safetensors"),
                     "--out", str(tmp_path / "x.safetensors"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag}:"), err


@pytest.mark.parametrize("out", ["x.pt", "x", "con.safetensors", "a..b.safetensors"])
def test_cli_train_refuses_output_paths_it_would_not_write(tmp_path, data, capsys, out):
    code = cli.main(["train", str(data), "--base", str(tmp_path / "never-read.safetensors"),
                     "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --out:"), err
    assert not list(tmp_path.glob("x*"))


@pytest.mark.parametrize("name", ["con", "CON.txt", "lpt1", "aux ", "．．", "a／b", "a＼b", "...", ".", "x.",
                                  "a\x7fb", "name.state", "name-state", "NAME-STATE.safetensors"])
def test_output_names_refused(name):
    with pytest.raises(OptionError, match="output_name"):
        check_output_name(name)


def test_output_names_are_nfc():
    assert check_output_name("e\u0301toile") == "\u00e9toile"
    assert check_output_name("Robot v2.safetensors") == "Robot v2"


def test_every_surface_refuses_the_same_values(tmp_path, data):
    with pytest.raises(OptionError, match="learning_rate"):
        config(data, tmp_path, learning_rate=float("nan"))
    with pytest.raises(OptionError, match="rank"):
        NetworkConfig(rank=0)
    with pytest.raises(RequestError, match="rank"):
        build_request({"output_name": "x", "dataset": {"train_dir": str(data)}, "network": {"rank": 0}},
                           tmp_path)
    with pytest.raises(RequestError, match="optimizer"):
        build_request({"output_name": "x", "dataset": {"train_dir": str(data)}, "optimizer": "Bogus"},
                           tmp_path)
