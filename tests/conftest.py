import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pytest
import torch

# Tiny models gain nothing from threads, and CI has two cores shared with pytest itself.
torch.set_num_threads(1)


def pytest_addoption(parser) -> None:
    from fuzz.runner import DEFAULT_CASES

    parser.addoption("--cases", type=int, default=DEFAULT_CASES, help="number of generated files for tests/fuzz")


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
