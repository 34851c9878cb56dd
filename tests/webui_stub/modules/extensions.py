"""Stub of modules/extensions.py (WebUI v1.10.1): the list of installed extensions."""
from modules import shared

extensions: list = []


def active():
    if shared.cmd_opts.disable_all_extensions:
        return []
    if shared.cmd_opts.disable_extra_extensions:
        return [x for x in extensions if x.enabled and x.is_builtin]
    return [x for x in extensions if x.enabled]


class Extension:
    def __init__(self, name, path, enabled=True, is_builtin=False, metadata=None):
        self.name = name
        self.path = path
        self.enabled = enabled
        self.is_builtin = is_builtin
        # the real canonical name is the folder name, lower-cased (metadata.ini's Name is not used)
        self.canonical_name = name.lower().strip()


def find_extension(filename):
    for ext in extensions:
        if str(filename).startswith(str(ext.path)):
            return ext
    return None
