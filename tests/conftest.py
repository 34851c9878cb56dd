import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch

# Tiny models gain nothing from threads, and CI has two cores shared with pytest itself.
torch.set_num_threads(1)
