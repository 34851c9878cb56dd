"""Stub of modules/safe.py (WebUI v1.10.1).

The real module keeps the original loader as ``unsafe_torch_load`` and sets ``torch.load = load``
on import: a checker that unpickles nothing itself, accepts only the zip members torch wrote in
2023 and, on any refusal, reports it and returns None.  Current torch adds members (such as
``.format_version``), so it refuses every file current torch saves.  Importing this stub does not
replace torch.load (it would do so for the whole test session); a test swaps ``load`` in itself.
"""
import re
import zipfile

import torch

_ALLOWED = re.compile(r"^[^/]+/(data/\d+|version|byteorder|\.data/serialization_id|data\.pkl)$")


def _refuses(filename) -> bool:
    try:
        with zipfile.ZipFile(filename) as z:
            return any(not _ALLOWED.match(n) for n in z.namelist())
    except zipfile.BadZipfile:
        return False  # the real one checks legacy pickles with a restricted unpickler


def load(filename, *args, **kwargs):
    return load_with_extra(filename, *args, extra_handler=None, **kwargs)


def load_with_extra(filename, extra_handler=None, *args, **kwargs):
    if _refuses(filename):
        print(f"Error verifying pickled file from {filename}")  # errors.report in the real one
        return None
    return unsafe_torch_load(filename, *args, **kwargs)


unsafe_torch_load = torch.load
