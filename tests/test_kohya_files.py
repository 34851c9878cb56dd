"""kohya's config files (issue 14): --config_file/--output_config, --dataset_config, and the API's and the
tab's import and export of the same files.

References: tests/data/sd_scripts_v0.10.1_output_config.toml was written by sd-scripts v0.10.1's own
--output_config; the dataset configs are its documentation's examples, transcribed.  Expected values
are read off those files and kohya's documented rules (a lower level wins; the command line wins over
a config file; the dataset config wins over the command line), not off our own output.
"""
from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from lib_lora.cli import _subparser, build_parser, main
from lib_lora.training import toml_io
from lib_lora.training.cli_args import train_data, with_config_file
from lib_lora.training.epochs import Batch
from lib_lora.training.errors import RequestError
from lib_lora.training.kohya_config import ConfigFileError, config_data, export_files, read_config
from lib_lora.training.kohya_dataset import HONOURED, DatasetConfigError, read_dataset_config
from lib_lora.training.request import build_request
from lib_lora.training.scan import scan
from lib_lora.training.subsets import DATASET_FIELDS, SUBSET_FIELDS

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent
KOHYA_OUTPUT = DATA / "sd_scripts_v0.10.1_output_config.toml"


def images(folder: Path, n: int, caption: str | None = "a, b, c, d, e, f", ext: str = ".txt",
           size: tuple[int, int] = (64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i % 255, 90, 160)).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}{ext}").write_text(caption, encoding="utf-8")
    return folder


def request(argv: list[str]):
    """The CLI's request for a ``train`` command line (the checkpoint is not read)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    assert not extra
    if args.config_file:
        args, extra = with_config_file(_subparser(parser, args), argv, args)
        assert not extra
    data, folder = train_data(args)
    return build_request(data, folder, presets=False)


# -- config.toml ----------------------------------------------------------------------------------

README_KOHYA = ["--pretrained_model_name_or_path", "model.safetensors", "--train_data_dir", "img", "--output_dir",
                "output", "--output_name", "my_lora", "--network_module", "networks.lora", "--network_dim", "16",
                "--network_alpha", "8", "--network_args", "conv_dim=8", "conv_alpha=4", "algo=locon",
                "--resolution", "512,512", "--enable_bucket", "--min_bucket_reso", "256", "--max_bucket_reso",
                "1024", "--train_batch_size", "2", "--max_train_epochs", "10", "--optimizer_type", "AdamW",
                "--optimizer_args", "weight_decay=0.1", "--learning_rate", "1e-4", "--unet_lr", "1e-4",
                "--text_encoder_lr", "5e-5", "--lr_scheduler", "cosine", "--mixed_precision", "fp16",
                "--save_precision", "fp16", "--save_model_as", "safetensors", "--save_every_n_epochs", "2",
                "--seed", "42", "--cache_latents", "--gradient_checkpointing", "--prior_loss_weight", "1.0",
                "--clip_skip", "1", "--caption_extension", ".txt"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images(tmp_path / "img" / "10_robot", 2)
    return tmp_path


def test_kohyas_own_output_config_reads_as_its_command_line(in_tmp):
    shutil.copy(KOHYA_OUTPUT, in_tmp / "kohya.toml")
    from_file = request(["train", "--config_file", "kohya.toml"])
    cfg = from_file.config
    # the file's values, as sd-scripts wrote them (text_encoder_lr as its one-element list)
    assert (cfg.network.rank, cfg.network.alpha, cfg.network.conv_rank, cfg.network.conv_alpha) == (16, 8.0, 8, 4.0)
    assert cfg.dataset.reso == (512, 512) and cfg.dataset.enable_buckets and cfg.dataset.caption_extension == ".txt"
    assert (cfg.batch_size, cfg.max_train_epochs, cfg.optimizer, cfg.weight_decay) == (2, 10, "AdamW", 0.1)
    assert (cfg.learning_rate, cfg.unet_lr, cfg.text_encoder_lr, cfg.lr_scheduler) == (1e-4, 1e-4, 5e-5, "cosine")
    assert (cfg.mixed_precision, cfg.save_precision, cfg.save_every_n_epochs, cfg.seed) == ("fp16", "fp16", 2, 42)
    assert cfg.cache_latents and cfg.gradient_checkpointing and cfg.clip_skip == 1
    assert (from_file.name, Path(cfg.output_dir).name, Path(cfg.dataset.train_dir).name) == ("my_lora", "output", "img")
    assert cfg == request(["train", *README_KOHYA]).config  # the file means its command line


def test_tables_only_group_the_keys(in_tmp):
    flat = toml_io.loads(KOHYA_OUTPUT.read_text(encoding="utf-8"))
    grouped = {"model": {k: flat.pop(k) for k in ("pretrained_model_name_or_path", "network_module")},
               "training": {k: flat.pop(k) for k in ("learning_rate", "seed")}, **flat}
    assert read_config(grouped) == read_config(toml_io.loads(KOHYA_OUTPUT.read_text(encoding="utf-8")))


def test_the_command_line_wins_over_the_file(in_tmp):
    shutil.copy(KOHYA_OUTPUT, in_tmp / "kohya.toml")
    images(in_tmp / "other" / "5_cat", 1)
    req = request(["train", "other", "--config_file", "kohya.toml", "--network_dim", "4", "--text_encoder_lr", "1e-5",
                   "--out", "elsewhere/x.safetensors", "--network_args", "conv_dim=2"])
    cfg = req.config
    assert (cfg.network.rank, cfg.text_encoder_lr, req.name, Path(cfg.output_dir).name) == (4, 1e-5, "x", "elsewhere")
    assert Path(cfg.dataset.train_dir).name == "other"
    # kohya's rule for a list: the command line's replaces the file's (conv_alpha back to its default)
    assert (cfg.network.conv_rank, cfg.network.conv_alpha) == (2, 1.0)
    assert (cfg.batch_size, cfg.max_train_epochs, cfg.weight_decay) == (2, 10, 0.1)  # the rest from the file


def test_output_config_round_trip(in_tmp, capsys):
    ours = ["train", "img", "--base", "m.safetensors", "--out", "loras/r.safetensors", "--network-dim", "8",
            "--conv-dim", "4", "--conv-alpha", "2", "--resolution", "512,768", "--keep-tokens", "2", "--flip-aug",
            "--no-buckets", "--unet-only", "--lean-frozen-layers", "on", "--save-last-k", "3",
            "--optimizer_args", "weight_decay=0.2", "betas=(0.9,0.99)", "--min-snr-gamma", "5", "--seed", "7"]
    assert main([*ours, "--config_file", "conf", "--output_config"]) == 0  # kohya adds ".toml"
    written = (in_tmp / "conf.toml").read_text(encoding="utf-8")
    assert not (in_tmp / "loras").exists()  # writing the config trains nothing
    back = request(["train", "--config_file", "conf.toml"])
    assert back.config == request(ours).config and back.name == "r"
    assert main([*ours, "--config_file", "conf.toml", "--output_config"]) == 2  # a file is never replaced
    assert "exists" in capsys.readouterr().err and (in_tmp / "conf.toml").read_text(encoding="utf-8") == written
    parsed = toml_io.loads(written)  # kohya's spellings where kohya has the option
    flat = {k: v for table in parsed.values() for k, v in table.items()}
    assert flat["network_dim"] == 8 and flat["network_args"] == ["conv_dim=4", "conv_alpha=2.0"]
    assert flat["resolution"] == "512,768" and flat["enable_bucket"] is False  # kohya's --resolution is text
    assert flat["network_train_unet_only"] is True and flat["pretrained_model_name_or_path"] == "m.safetensors"


def test_output_config_keeps_the_sample_settings(in_tmp):
    (in_tmp / "prompts.txt").write_text("zkx, robot --w 512 --h 768 --s 20 --d 1\nzkx --n blurry\n", encoding="utf-8")
    ours = ["train", "img", "--base", "m.safetensors", "--out", "loras/r.safetensors", "--sample_prompts",
            "prompts.txt", "--sample_every_n_epochs", "2", "--sample_every_n_steps", "50", "--sample_sampler",
            "euler_a", "--sample_at_first", "--network_train_unet_only"]
    assert main([*ours, "--config_file", "conf.toml", "--output_config"]) == 0
    flat = {k: v for table in toml_io.loads((in_tmp / "conf.toml").read_text(encoding="utf-8")).values()
            for k, v in table.items()}
    # kohya's keys and format: the prompt file's path, as given
    assert (flat["sample_prompts"], flat["sample_every_n_epochs"], flat["sample_every_n_steps"],
            flat["sample_sampler"], flat["sample_at_first"]) == ("prompts.txt", 2, 50, "euler_a", True)
    back = request(["train", "--config_file", "conf.toml"]).config
    assert back == request(ours).config
    assert back.sample_prompts == ["zkx, robot --w 512 --h 768 --s 20 --d 1", "zkx --n blurry"]
    # the tab's and the API's export has no prompt file: the lines go in as a list, and read back
    files = export_files(back)
    assert toml_io.loads(files["config_toml"])["sample_images"]["sample_prompts"] == back.sample_prompts
    again = build_request({"output_name": "r", "config_toml": files["config_toml"],
                           "dataset_toml": files["dataset_toml"]}, in_tmp).config
    assert (again.sample_prompts, again.sample_every_n_epochs, again.sample_sampler) == \
        (back.sample_prompts, 2, "euler_a")


def test_written_values_mean_the_same_to_kohya():
    flat = {k: v for table in config_data({}).values() for k, v in table.items()}
    # sd-scripts takes the step modulo these and has None for "off": our 0 is left out
    assert not {"save_every_n_steps", "save_every_n_epochs", "sample_every_n_steps"} & set(flat)
    # sd-scripts refuses to cache text-encoder outputs while training the encoder (sdxl_train_network.py);
    # here the cache is then simply not used, so the file says what happens
    assert flat["cache_text_encoder_outputs"] is False and flat["cache_latents"] is True
    frozen = config_data({"network": {"train_text_encoder": False}})
    assert {k: v for table in frozen.values() for k, v in table.items()}["cache_text_encoder_outputs"] is True
    cropped = config_data({"dataset": {"random_crop": True}})
    assert {k: v for table in cropped.values() for k, v in table.items()}["cache_latents"] is False
    coloured = config_data({"dataset": {"color_aug": True}})  # sd-scripts refuses cache_latents with color_aug
    flat = {k: v for table in coloured.values() for k, v in table.items()}
    assert flat["cache_latents"] is False and flat["color_aug"] is True


def test_unknown_keys_are_refused_by_name(in_tmp, capsys):
    text = KOHYA_OUTPUT.read_text(encoding="utf-8") + "lowram = true\nmasked_loss = true\n"
    (in_tmp / "k.toml").write_text(text, encoding="utf-8")
    assert main(["train", "--config_file", "k.toml"]) == 2
    err = capsys.readouterr().err
    assert "lowram" in err and "masked_loss" in err
    with pytest.raises(ConfigFileError, match="one value serves every text encoder"):
        read_config({"text_encoder_lr": [5e-5, 1e-5]})
    with pytest.raises(ConfigFileError, match="algo=loha"):
        read_config({"network_args": ["algo=loha"]})


# -- dataset.toml -----------------------------------------------------------------------------------

def test_the_documented_example_refuses_its_fine_tuning_dataset_by_name():
    data = toml_io.load(DATA / "sd_scripts_config_README_dataset_example.toml")
    with pytest.raises(DatasetConfigError, match=r"datasets\[1\]\.subsets\[0\]\.metadata_file"):
        read_dataset_config(data, "example.toml")


def test_the_documented_separator_example_is_refused_by_name():
    data = toml_io.load(DATA / "sd_scripts_config_README_separator_example.toml")
    with pytest.raises(DatasetConfigError, match="secondary_separator"):
        read_dataset_config(data, "example.toml")  # (its color_aug = false at [general] is accepted)
    del data["datasets"][0]["secondary_separator"]
    with pytest.raises(DatasetConfigError, match="enable_wildcard"):
        read_dataset_config(data, "example.toml")


def _kept(ds, item, n_tags: int, tries: int = 40) -> tuple[set[str], set[str]]:
    """The first n tags and the rest of ``item``'s trained caption over ``tries`` draws."""
    heads, tails = set(), set()
    for epoch in range(tries):
        batch = Batch(epoch, 0, item.bucket, (item,), 0)
        tags = ds.sample(batch, 0).caption.split(", ")
        heads.add(", ".join(tags[:n_tags]))
        tails.add(", ".join(tags[n_tags:]))
    return heads, tails


def test_the_documented_dreambooth_dataset_trains_with_each_levels_settings(tmp_path):
    """The example's DreamBooth part, its folders made here: keep_tokens 2 from the dataset, 3 from its
    own subset, 1 on the reg subset; shuffle and caption extension from [general]."""
    text = (DATA / "sd_scripts_config_README_dataset_example.toml").read_text(encoding="utf-8")
    for name in ("hoge", "fuga", "reg"):
        images(tmp_path / name, 2)
        text = text.replace(f"C:\\{name}", str(tmp_path / name))
    data = toml_io.loads(text)
    del data["datasets"][1]  # the fine-tuning dataset, which is refused
    general, top = read_dataset_config(data)
    req = build_request({"output_name": "x", "dataset": general, **top}, tmp_path, presets=False)
    assert req.config.batch_size == 4 and req.config.dataset.reso == (512, 512)
    ds = scan(req.config.dataset)
    by_dir = {Path(i.path).parent.name: i for i in ds.items}
    for name, keep in (("hoge", 2), ("fuga", 3), ("reg", 1)):
        heads, tails = _kept(ds, by_dir[name], keep)
        assert heads == {", ".join("abcdef"[:keep])}, name  # the kept tags stay in front
        assert len(tails) > 1, name                          # the rest is shuffled
    assert by_dir["reg"].is_reg and not by_dir["hoge"].is_reg
    # kohya's balancing: 4 train samples (2 folders x 2 images x 1 repeat), so the 2 reg images x 2
    assert [i.repeats for i in ds.items if i.is_reg] == [2, 2]
    assert ds.dataset_dirs() == {"hoge": {"n_repeats": 1, "img_count": 2}, "fuga": {"n_repeats": 1, "img_count": 2}}


def test_per_subset_extension_repeats_class_tokens_and_flip(tmp_path):
    images(tmp_path / "a", 2, caption="from txt", ext=".txt")
    images(tmp_path / "b", 2, caption="from caption", ext=".caption")
    images(tmp_path / "c", 1, caption=None)  # no caption files: class_tokens
    text = f"""
[general]
flip_aug = true
[[datasets]]
resolution = 64
enable_bucket = false
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  num_repeats = 3
  flip_aug = false
  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  caption_extension = ".caption"
  [[datasets.subsets]]
  image_dir = '{tmp_path / "c"}'
  class_tokens = "sks cat"
  num_repeats = 5
"""
    req = build_request({"output_name": "x", "dataset_toml": text}, tmp_path, presets=False)
    ds = scan(req.config.dataset)
    got = {(Path(i.path).parent.name, i.caption, i.repeats) for i in ds.items}
    assert got == {("a", "from txt", 3), ("b", "from caption", 1), ("c", "sks cat", 5)}
    flips = {}
    for item in ds.items:
        draws = {ds.sample(Batch(e, 0, item.bucket, (item,), 0), 0).flip for e in range(30)}
        flips.setdefault(Path(item.path).parent.name, set()).update(draws)
    assert flips == {"a": {False}, "b": {False, True}, "c": {False, True}}


def test_two_resolutions_bucket_and_balance_per_dataset(tmp_path):
    """kohya's documented duplicate rule: the same image_dir in two datasets trains at both sizes."""
    images(tmp_path / "hoge", 2, size=(96, 64))
    images(tmp_path / "reg", 3)
    text = f"""
[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{tmp_path / "hoge"}'
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg"}'
  is_reg = true
[[datasets]]
resolution = [128, 128]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "hoge"}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "hoge"}'
"""
    req = build_request({"output_name": "x", "dataset_toml": text}, tmp_path, presets=False)
    ds = scan(req.config.dataset, strict=False)
    train = [(i.bucket, i.repeats) for i in ds.items if not i.is_reg]
    # by hand: at 64 the only bucket with sides 64..256 is 64x64; at 128 the buckets are 128x128, 64x256,
    # 192x64, 256x64 (and turned), of which 128x128's ratio is the nearest to 96x64's 1.5
    assert sorted(train) == [((64, 64), 1)] * 2 + [((128, 128), 2)] * 2

    # the metadata, as train_network.py (v0.10.1) writes it for a dataset config: each dataset's
    # resolution in ss_datasets and no ss_resolution; modelspec.resolution from --resolution (the
    # fallback, here our default 512), not the first dataset's
    from lib_lora.metadata import metadata_summary
    from lib_lora.training.metadata import build_metadata
    cfg = req.config
    meta = build_metadata(family="sd1", prediction="epsilon", session_id="1", started_at=0.0, output_name="x",
                          cfg=cfg, dataset=ds, model_name="m", model_hash="", legacy_hash="", steps=1, epoch=1,
                          num_batches_per_epoch=1, max_steps=1, optimizer_desc="torch.optim.AdamW",
                          resolution=cfg.dataset.reso)
    assert "ss_resolution" not in meta and meta["modelspec.resolution"] == "512x512"
    assert [d["resolution"] for d in json.loads(meta["ss_datasets"])] == [[64, 64], [128, 128]]
    assert ("Resolution", "(64, 64), (128, 128)") in metadata_summary(meta)  # the cards show both
    # train_network.py's single-dataset keys (its else branch) are left out, as it leaves them out; the
    # cards' bucket row then sums the datasets' bucket_info
    left_out = ["ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
                "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale",
                "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_keep_tokens", "ss_reg_dataset_dirs", "ss_bucket_info"]
    assert [k for k in left_out if k in meta] == [] and "ss_dataset_dirs" in meta and "ss_tag_frequency" in meta
    # by hand: at 64, 2 images and the 2 reg images used; at 128, 2 images x 2 repeats
    assert ("Buckets", "128x128 (4), 64x64 (4)") in metadata_summary(meta)
    # reg images balance against their own dataset: 2 samples there, so 2 of the 3 reg images, once each
    assert [i.repeats for i in ds.items if i.is_reg] == [1, 1] and len(ds.unused_reg) == 1
    assert any(p.kind == "duplicate_subset" for p in ds.problems)  # kohya's: a dataset takes a folder once
    assert ds.dataset_dirs() == {"hoge": {"n_repeats": 1, "img_count": 2}, "hoge (2)": {"n_repeats": 2, "img_count": 2}}


@pytest.mark.parametrize("text,message", [
    ("[general]\nimage_dir = 'x'\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'x'\n",
     r"\[general\]: 'image_dir' is not allowed here; kohya takes it in \[\[datasets.subsets\]\]"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  imag_dir = 'x'\n", "'imag_dir' is not a key of kohya's dataset config"),
    ("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'x'\n  resolution = 512\n",
     r"'resolution' is not allowed here; kohya takes it in \[general\] or \[\[datasets\]\]"),
    ("[[datasets]]\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = 'x'\n[[datasets]]\nbatch_size = 4\n"
     "  [[datasets.subsets]]\n  image_dir = 'y'\n", "one batch size serves every dataset"),
    ("[general]\nenable_wildcard = true\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'x'\n",
     r"general\.enable_wildcard = True: wildcard and multi-line captions are not implemented"),
    ("[[datasets]]\nnetwork_multiplier = 0.5\n  [[datasets.subsets]]\n  image_dir = 'x'\n", "network_multiplier"),
    ("[[datasets]]\n", "needs at least one"),
    ("[dataset]\n", "'dataset' is not a key"),
])
def test_what_cannot_be_honoured_is_refused_by_name(text, message):
    with pytest.raises(DatasetConfigError, match=message):
        read_dataset_config(toml_io.loads(text), "d.toml")


def test_every_honoured_key_is_a_dataset_option():
    assert set(HONOURED) == set(DATASET_FIELDS + SUBSET_FIELDS)


def test_an_image_dir_holding_repeat_folders_is_explained(tmp_path):
    images(tmp_path / "img" / "10_robot", 1)
    text = f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'img'}'\n"
    req = build_request({"output_name": "x", "dataset_toml": text}, tmp_path, presets=False)
    with pytest.raises(Exception, match=r"image_dir = '.*10_robot' with num_repeats = 10 and class_tokens = 'robot'"):
        scan(req.config.dataset)


# -- the command line with --dataset_config -------------------------------------------------------

def test_dataset_config_wins_over_the_command_line_which_stays_the_fallback(in_tmp, capsys):
    images(in_tmp / "sub", 1)
    (in_tmp / "d.toml").write_text(f"[general]\nkeep_tokens = 1\n[[datasets]]\nbatch_size = 3\n"
                                   f"  [[datasets.subsets]]\n  image_dir = '{in_tmp / 'sub'}'\n", encoding="utf-8")
    req = request(["train", "--train_data_dir", "img", "--base", "m", "--out", "x.safetensors", "--keep_tokens", "2",
                   "--shuffle_caption", "--train_batch_size", "5", "--dataset_config", "d.toml"])
    d = req.config.dataset
    assert (d.keep_tokens, d.shuffle_caption, req.config.batch_size, d.train_dir) == (1, True, 3, None)
    err = capsys.readouterr().err
    assert "--train_data_dir ignored" in err and "--keep-tokens 2 is overridden" in err and "batch_size" in err


# -- the API and the tab ----------------------------------------------------------------------------

def test_the_api_reads_both_files_and_confines_their_folders(tmp_path):
    roots = [tmp_path / "data"]
    images(tmp_path / "data" / "sub", 1)
    images(tmp_path / "outside", 1)
    config = KOHYA_OUTPUT.read_text(encoding="utf-8")
    dataset = f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'data' / 'sub'}'\n"
    req = build_request({"config_toml": config, "dataset_toml": dataset, "network": {"rank": 4}}, tmp_path / "loras",
                        dataset_roots=roots)
    cfg = req.config
    assert (cfg.network.rank, cfg.network.conv_rank, cfg.batch_size, req.preset) == (4, 8, 2, "none")  # ours win
    assert Path(cfg.output_dir) == tmp_path / "loras" and any("output_dir" in n for n in req.notes)
    assert any("pretrained_model_name_or_path" in n for n in req.notes)
    with pytest.raises(RequestError, match="outside the dataset folders"):
        build_request({"config_toml": config, "dataset_toml": dataset.replace("data/sub", "outside")}, tmp_path,
                      dataset_roots=roots)
    with pytest.raises(RequestError, match="give it or dataset_toml, not both"):
        build_request({"output_name": "x", "dataset": {"train_dir": str(tmp_path / "data")}, "dataset_toml": dataset},
                      tmp_path)


def test_export_writes_files_kohya_reads_back(tmp_path):
    images(tmp_path / "img" / "10_robot", 2)
    images(tmp_path / "img" / "5_sks dog", 1)
    images(tmp_path / "reg" / "1_dog", 3)
    req = build_request({"output_name": "r", "dataset": {"train_dir": str(tmp_path / "img"),
                                                         "reg_dir": str(tmp_path / "reg"), "keep_tokens": 2},
                         "network": {"rank": 8}, "max_train_steps": 10}, tmp_path)
    files = export_files(req.config)
    dataset = toml_io.loads(files["dataset_toml"])
    # kohya's reading of --train_data_dir: one dataset, a subset per <repeats>_<trigger> folder
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s["class_tokens"], s["is_reg"])
            for s in dataset["datasets"][0]["subsets"]] == [("10_robot", 10, "robot", False),
                                                            ("5_sks dog", 5, "sks dog", False),
                                                            ("1_dog", 1, "dog", True)]
    back = build_request({"output_name": "r", "config_toml": files["config_toml"],
                          "dataset_toml": files["dataset_toml"]}, tmp_path)
    assert back.config.network == req.config.network and back.config.max_train_steps == 10
    a, b = scan(req.config.dataset), scan(back.config.dataset)
    assert [(i.path, i.caption, i.repeats, i.is_reg) for i in a.items] == \
        [(i.path, i.caption, i.repeats, i.is_reg) for i in b.items]
    assert b.settings(b.items[0]).keep_tokens == 2


def test_the_api_route_exports(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lora.api import PREFIX, add_training_routes
    from lib_lora.training.jobs import JobRunner

    class Host:
        def output_dir(self):
            return tmp_path / "loras"

        def family(self):
            return "sd1"

        def dataset_roots(self):
            return [tmp_path / "data"]

    images(tmp_path / "data" / "3_cat", 1)
    app = FastAPI()
    add_training_routes(app, lambda: JobRunner(Host()))
    client = TestClient(app)
    body = {"output_name": "c", "dataset": {"train_dir": str(tmp_path / "data")}}
    r = client.post(f"{PREFIX}/train/export", json=body)
    assert r.status_code == 200, r.text
    assert toml_io.loads(r.json()["dataset_toml"])["datasets"][0]["subsets"][0]["num_repeats"] == 3
    bad = client.post(f"{PREFIX}/train/export", json={"output_name": "c", "config_toml": "lowram = true"})
    assert bad.status_code == 400 and "lowram" in bad.json()["detail"]
    noted = client.post(f"{PREFIX}/train/export", json={**body, "config_toml": "xformers = true"})
    assert noted.status_code == 200 and "config_toml: xformers: attention already runs fused" in noted.json()["notes"][0]


def test_the_tab_fills_its_form_from_the_files_and_writes_them(tmp_path, monkeypatch):
    import sys

    import gradio_standin
    from lib_lora.training import ui
    from lib_lora.training.jobs import JobRunner

    class Host:
        def output_dir(self):
            return tmp_path

        def family(self):
            return "sd1"

        def dataset_roots(self):
            return [tmp_path]

    monkeypatch.setitem(sys.modules, "gradio", gradio_standin)
    ((tab, _, _),) = ui.create_tab(JobRunner(Host()))
    find = gradio_standin.find

    def handler(elem_id: str, event: str = "click"):
        return next(e for e in find(tab, elem_id).events if e.name == event)

    imp = handler("lora_workshop_import")
    dataset = f"[general]\nresolution = 768\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{tmp_path}'\n"
    out = imp.fn(KOHYA_OUTPUT.read_text(encoding="utf-8"), dataset)
    values = {c.kwargs["elem_id"].removeprefix("lora_workshop_"): u["value"]
              for c, u in zip(imp.outputs[1:], out[1:]) if "value" in u}
    assert values["network_rank"] == 16 and values["network_conv_rank"] == 8 and values["batch_size"] == 2
    assert values["dataset_resolution"] == 768 and values["dataset_train_dir"] == ""  # the dataset file's
    assert values["text_encoder_lr"] == 5e-5 and values["lr_scheduler"] == "cosine"
    assert "pretrained_model_name_or_path" in out[0]  # the message says what the tab does not use
    skip = imp.fn("clip_skip = 2\n", "")
    assert dict(zip([c.kwargs["elem_id"] for c in imp.outputs[1:]], skip[1:]))["lora_workshop_clip_skip"]["value"] == 2
    up = handler("lora_workshop_toml_file", "upload")
    assert up.fn(dataset.encode())[1] == dataset and up.fn(b"seed = 1\n")[0] == "seed = 1\n"
    # write: the form (here its defaults with a folder and a name) as the two files
    images(tmp_path / "img" / "4_owl", 1)
    exp = handler("lora_workshop_export")
    form = {c.kwargs["elem_id"]: c.kwargs.get("value") for c in exp.inputs[3:]}
    form["lora_workshop_dataset_train_dir"] = str(tmp_path / "img")
    form["lora_workshop_output_name"] = "owl"
    config_text, dataset_text, message = exp.fn(exp.inputs[0].kwargs["value"], "", "", *form.values())
    assert "error" not in message, message
    assert toml_io.loads(dataset_text)["datasets"][0]["subsets"][0]["class_tokens"] == "owl"
    assert "output_name" in config_text


def test_readme_shows_files_that_work_unchanged(in_tmp):
    """The README's command line, config.toml and dataset.toml, with the folders they name."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = {name: textwrap.dedent(text) for _, name, text in
              re.findall(r"^( *)```toml\n\1# (\S+)\n(.*?)^\1```", readme, re.S | re.M)}
    assert set(blocks) >= {"config.toml", "dataset.toml"}
    for name, text in blocks.items():
        (in_tmp / name).write_text(text, encoding="utf-8")
    dataset = toml_io.loads(blocks["dataset.toml"])
    for part in dataset["datasets"]:
        for sub in part["subsets"]:
            images(in_tmp / sub["image_dir"], 2)
    line = re.search(r"python -m lib_lora train (--config_file config\.toml --dataset_config dataset\.toml)\n",
                     readme).group(1)
    assert "model.safetensors" in blocks["config.toml"]  # (the checkpoint is not read here)
    req = request(["train", *line.split()])
    ds = scan(req.config.dataset)
    assert ds.summary(req.config.batch_size)["ok"]
    assert {(Path(i.path).parent.name, i.repeats, i.is_reg) for i in ds.items if not i.is_reg} == \
        {(Path(s["image_dir"]).name, s.get("num_repeats", 1), False) for p in dataset["datasets"]
         for s in p["subsets"] if not s.get("is_reg")}
    general = dataset["general"]
    for sub in dataset["datasets"][0]["subsets"]:  # each folder's images with its subset's settings
        item = next(i for i in ds.items if Path(i.path).parent.resolve() == (in_tmp / sub["image_dir"]).resolve())
        got = ds.settings(item)
        assert (got.keep_tokens, got.flip_aug, got.shuffle_caption, item.is_reg) == \
            (sub.get("keep_tokens", general["keep_tokens"]), sub.get("flip_aug", False), True, sub.get("is_reg", False))
    cfg = req.config
    assert (cfg.batch_size, cfg.dataset.reso, cfg.network.rank, cfg.network.conv_rank, req.name) == \
        (2, (512, 512), 16, 8, "robot")


def test_a_short_run_from_both_files(tmp_path):
    """Training through the command line with --config_file and --dataset_config, at toy size."""
    import torch

    from lib_lora.fileio import load_safetensors
    from lib_lora.hosts.cli.checkpoint import Checkpoint, save_checkpoint
    from tiny_models import build_sd1
    from train_support import tiny_vae

    tiny = build_sd1(seed=0)
    ckpt = save_checkpoint(Checkpoint.from_modules("sd1", tiny.unet, tiny.text_encoders, tiny_vae()),
                           tmp_path / "toy.safetensors", dtype=torch.float32)
    images(tmp_path / "a", 2)
    images(tmp_path / "b", 1, caption="owl")
    (tmp_path / "c.toml").write_text(
        f"[model]\npretrained_model_name_or_path = '{ckpt}'\n[out]\noutput_dir = '{tmp_path / 'out'}'\n"
        "output_name = 'k'\nsave_precision = 'float'\n[train]\nnetwork_dim = 2\nnetwork_alpha = 2\n"
        "max_train_steps = 2\nlearning_rate = 1e-3\nseed = 3\n", encoding="utf-8")
    (tmp_path / "d.toml").write_text(
        f"[general]\nresolution = 64\nenable_bucket = false\nshuffle_caption = true\n[[datasets]]\nbatch_size = 2\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'a'}'\n  keep_tokens = 2\n"
        f"  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'b'}'\n  num_repeats = 2\n  flip_aug = true\n",
        encoding="utf-8")
    assert main(["train", "--config_file", str(tmp_path / "c.toml"), "--dataset_config", str(tmp_path / "d.toml")]) == 0
    sd, meta = load_safetensors(tmp_path / "out" / "k.safetensors")
    # sd-scripts writes no ss_batch_size_per_device for a dataset config (train_network.py v0.10.1 writes it in
    # its single-dataset branch only): the batch size is ss_datasets' batch_size_per_device, below
    assert meta["ss_steps"] == "2" and "ss_batch_size_per_device" not in meta and meta["ss_network_dim"] == "2"
    assert all(torch.isfinite(v).all() for v in sd.values())
    # ss_datasets, as train_network.py (v0.10.1) writes it for a dataset config: these keys, per dataset
    # and per subset (transcribed from its source)
    (info,) = json.loads(meta["ss_datasets"])
    assert set(info) == {"is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images",
                         "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "tag_frequency",
                         "bucket_info", "resize_interpolation", "subsets"}
    assert set(info["subsets"][0]) == {"img_count", "num_repeats", "color_aug", "flip_aug", "random_crop",
                                       "shuffle_caption", "keep_tokens", "keep_tokens_separator",
                                       "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
                                       "resize_interpolation", "image_dir", "class_tokens", "is_reg"}
    assert (info["num_train_images"], info["resolution"], info["min_bucket_reso"], info["bucket_info"]) == \
        (2 * 1 + 1 * 2, [64, 64], None, None)
    assert info["batch_size_per_device"] == 2
    a, b = info["subsets"]
    assert (a["image_dir"], a["keep_tokens"], a["flip_aug"], b["num_repeats"], b["flip_aug"]) == ("a", 2, False, 2, True)
    assert info["tag_frequency"] == {"a": {t: 2 for t in "abcdef"}, "b": {"owl": 1}}


def test_a_state_files_record_of_a_dataset_config_reads_back(tmp_path):
    """Resuming rebuilds the request from the config a state file keeps (state.config_record)."""
    from lib_lora.training.request import _TOP_EXCLUDED
    from lib_lora.training.state import config_record

    images(tmp_path / "a", 1)
    text = f"[[datasets]]\nresolution = [64, 128]\n  [[datasets.subsets]]\n  image_dir = '{tmp_path / 'a'}'\n" \
           "  keep_tokens = 1\n  num_repeats = 3\n"
    req = build_request({"output_name": "r", "dataset_toml": text}, tmp_path, presets=False)
    record = config_record(req.config)
    data = {k: v for k, v in record.items() if k not in _TOP_EXCLUDED}
    data.update(dataset=record["dataset"], network=record["network"])
    assert build_request(data, tmp_path, presets=False).config == req.config


def test_python_3_10_reads_toml_with_the_toml_package(monkeypatch):
    """The WebUI 1.10's Python has no tomllib: the toml package install.py adds reads the same."""
    import tomllib
    pytest.importorskip("toml")
    text = (DATA / "sd_scripts_config_README_dataset_example.toml").read_text(encoding="utf-8")
    monkeypatch.setitem(__import__("sys").modules, "tomllib", None)
    assert toml_io.loads(text) == tomllib.loads(text)
    with pytest.raises(toml_io.TomlError, match="d.toml: not valid TOML"):
        toml_io.loads("a = ", "d.toml")


# -- kohya's options that set nothing here ----------------------------------------------------------

NOTED = [(["--xformers"], "xformers: attention already runs fused here"),
         (["--sdpa"], "sdpa: attention already runs fused here"),
         (["--mem_eff_attn"], "mem_eff_attn: attention already runs fused here"),
         (["--max_data_loader_n_workers", "8"], "max_data_loader_n_workers 8: no data-loader worker processes here"),
         (["--persistent_data_loader_workers"], "persistent_data_loader_workers: no data-loader worker processes")]


@pytest.mark.parametrize("flags,line", NOTED)
def test_kohyas_attention_and_loader_options_are_taken_and_answered(in_tmp, flags, line):
    from lib_lora.training.cli_args import noted_lines
    base = ["train", "img", "--base", "m.safetensors", "--out", "o.safetensors"]
    for spelled in (flags, [flags[0].replace("_", "-"), *flags[1:]]):
        args = build_parser().parse_args([*base, *spelled])
        (got,) = noted_lines(args)
        assert got.startswith(line)
        assert request([*base, *spelled]).config == request(base).config  # they set nothing
    assert noted_lines(build_parser().parse_args(base)) == []


def test_config_files_with_them_are_read_and_answered(in_tmp):
    from lib_lora.training.cli_args import noted_lines
    from lib_lora.training.kohya_config import noted
    text = KOHYA_OUTPUT.read_text(encoding="utf-8") + \
        "xformers = true\nsdpa = false\nmax_data_loader_n_workers = 4\npersistent_data_loader_workers = true\n"
    (in_tmp / "k.toml").write_text(text, encoding="utf-8")
    data, extras = read_config(toml_io.loads(text))
    assert [line.split(":")[:2] for line in noted(extras, "k.toml")] == \
        [["k.toml", " xformers"], ["k.toml", " max_data_loader_n_workers 4"],
         ["k.toml", " persistent_data_loader_workers"]]  # sdpa = false: nothing to say
    parser = build_parser()
    argv = ["train", "--config_file", "k.toml", "--max-data-loader-n-workers", "2"]
    args, _ = with_config_file(_subparser(parser, parser.parse_args(argv)), argv, parser.parse_args(argv))
    assert [line.split(":")[0] for line in noted_lines(args)] == \
        ["xformers", "max_data_loader_n_workers 2", "persistent_data_loader_workers"]  # the command line wins
    assert request(["train", "--config_file", "k.toml"]).config == request(["train", *README_KOHYA]).config
    api = build_request({"output_name": "x", "config_toml": text, "dataset": {"train_dir": str(in_tmp / "img")}},
                        in_tmp)
    assert any(n.startswith("config_toml: xformers: attention already runs fused") for n in api.notes)
    for bad, message in (("xformers = 'yes'", "expected true or false"),
                         ("max_data_loader_n_workers = 1.5", "expected a whole number")):
        with pytest.raises(ConfigFileError, match=message):
            read_config(toml_io.loads(bad))
