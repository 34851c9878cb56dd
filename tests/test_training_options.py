"""The option schema (training/options.py) is the one list: the dataclasses, the CLI, the tab, the
presets and the ss_* metadata all agree with it (issue 12, item 1)."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from lib_lora import cli
from lib_lora.training import options, ui
from lib_lora.training.config import TrainConfig
from lib_lora.training.dataset import DatasetConfig
from lib_lora.training.metadata import option_metadata
from lib_lora.training.network import NetworkConfig
from lib_lora.training.presets import PRESETS
from train_support import make_dataset

SETS = {"": TrainConfig, "dataset": DatasetConfig, "network": NetworkConfig}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=1, repeats=1)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return options.REQUIRED


@pytest.mark.parametrize("set_name", list(SETS))
def test_each_dataclass_field_is_one_option_of_the_same_type_and_default(set_name):
    cls = SETS[set_name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("dataset", "network")}
    declared = {o.name: o for o in options.section(set_name)}
    assert set(fields) == set(declared)
    for name, f in fields.items():
        assert hints[name] == declared[name].type, name
        assert _field_default(f) == declared[name].default, name


def test_the_trainer_knows_every_save_precision_the_schema_accepts():
    from lib_lora.training.saves import SAVE_DTYPES
    assert set(SAVE_DTYPES) == set(options.option("save_precision").choices)


def test_the_tab_shows_the_labelled_options_in_the_schema_order():
    assert [title for title, _, _ in ui.SECTIONS] == [g for g, _ in options.GROUPS]
    labelled = [o.key for o in options.OPTIONS if o.label]
    assert sorted(ui.KEYS[1:]) == sorted(labelled)
    assert dict((k, kind) for k, _, kind, _ in ui.FIELDS)["lean_frozen_layers"] == "auto_bool"
    advanced = {k: kind for k, _, kind, _ in ui.SECTIONS[-1][2]}
    assert advanced["clip_skip"] == "opt_int"  # kohya's clip skip, 0 = unset on the tab
    # kohya's caption limit (0 = none) and its v2 (a tick the WebUI host checks against the loaded model)
    assert (advanced["max_token_length"], advanced["v2"]) == ("opt_int", "bool")
    assert dict((k, e) for k, _, _, e in ui.FIELDS)["mixed_precision"]["choices"] == ["auto", "no", "fp16", "bf16"]


def test_presets_name_only_schema_options_with_valid_values():
    for preset in PRESETS.values():
        for key, value in preset.items():
            if key in ("dataset", "network"):
                for sub in value:
                    assert f"{key}.{sub}" in {o.key for o in options.OPTIONS}, (key, sub)
            else:
                o = options.option(key)
                if o.choices and key != "mixed_precision":  # "auto" is a request value
                    assert value in o.choices, key


def _other_value(o: options.Option) -> list[str]:
    """Command-line words that set ``o`` to something other than its default."""
    if o.flag_action:
        return [o.flag]
    if o.key == "optimizer":  # the others need packages that may not be installed
        return [o.flag, "adamw"]
    choices = o.cli_choices if o.cli_choices is not None else o.choices
    if choices:
        return [o.flag, str(next(c for c in choices if c not in (o.default, "auto")))]
    if o.type in (int, int | None):
        if o.maximum is not None:  # clip_skip: only its maximum is accepted
            return [o.flag, str(int(o.maximum))]
        return [o.flag, str((o.default or 0) + 3)]
    if o.type in (float, float | None):
        return [o.flag, "0.25"]
    return [o.flag, "1024" if o.name == "resolution" else "xyz"]


def test_every_flag_reaches_the_config_it_names(data, tmp_path):
    base = ["train", str(data), "--base", "never-read", "--out", str(tmp_path / "x.safetensors")]
    parser = cli.build_parser()
    defaults = cli._train_config(parser.parse_args(base))
    for o in options.OPTIONS:
        if not (o.flag and o.flag.startswith("--")) or o.key in ("dataset.reg_dir", "network_weights"):
            continue  # paths that must exist (test_cli_train covers them)
        needs = {"full_fp16": ["--mixed-precision", "fp16"], "full_bf16": ["--mixed-precision", "bf16"]}
        cfg = cli._train_config(parser.parse_args(base + needs.get(o.name, []) + _other_value(o)))
        holder, was = (getattr(cfg, o.section), getattr(defaults, o.section)) if o.section else (cfg, defaults)
        assert getattr(holder, o.name) != getattr(was, o.name), o.key
    assert (defaults.network.rank, defaults.max_train_steps, defaults.mixed_precision) == (16, 1000, "no")


def test_the_cli_validates_through_the_request_path(data, tmp_path, capsys):
    code = cli.main(["train", str(data), "--base", "never-read", "--out", str(tmp_path / "x.safetensors"),
                     "--reg-dir", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --reg-dir: dataset folder not found"), err


def test_ss_keys_read_their_options(data, tmp_path):
    cfg = TrainConfig(DatasetConfig(data, keep_tokens=2, flip_aug=True), NetworkConfig(rank=5, alpha=3.0),
                      learning_rate=3e-4, lr_scheduler="cosine", seed=7, output_name="n")
    meta = option_metadata(cfg)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_learning_rate"]) == (5, 3.0, 3e-4)
    assert (meta["ss_keep_tokens"], meta["ss_flip_aug"], meta["ss_lr_scheduler"], meta["ss_seed"]) == \
        (2, True, "cosine", 7)
    assert meta["ss_output_name"] == "n"
