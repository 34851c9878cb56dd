import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch

# Tiny models gain nothing from threads, and CI has two cores shared with pytest itself.
torch.set_num_threads(1)


def pytest_addoption(parser) -> None:
    from fuzz.runner import DEFAULT_CASES

    parser.addoption("--cases", type=int, default=DEFAULT_CASES, help="number of generated files for tests/fuzz")
