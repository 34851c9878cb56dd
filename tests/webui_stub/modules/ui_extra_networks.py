"""Stub of modules/ui_extra_networks.py (WebUI v1.10.1): extra-network pages (the cards tabs).

Real HTML rendering is left out; item dicts, page registration and the helper methods
subclasses call keep their real names and parameters.
"""
import json
import os
import urllib.parse
from pathlib import Path

from modules import extra_networks, shared, ui_extra_networks_user_metadata, util

extra_pages = []
allowed_dirs = set()
default_allowed_preview_extensions = ["png", "jpg", "jpeg", "webp", "gif"]


def allowed_preview_extensions():
    return set(default_allowed_preview_extensions) | {shared.opts.samples_format}


def register_page(page):
    """registers extra networks page for the UI; recommend doing it in on_before_ui() callback for extensions"""
    extra_pages.append(page)
    allowed_dirs.clear()
    allowed_dirs.update(set(sum([x.allowed_directories_for_previews() for x in extra_pages], [])))


def quote_js(s):
    s = s.replace('\\', '\\\\').replace('"', '\\"')
    return f'"{s}"'


def path_is_parent(parent_path, child_path):
    return os.path.abspath(child_path).startswith(os.path.abspath(parent_path))


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.metadata = {}
        self.items = {}
        self.lister = util.MassFileLister()

    def refresh(self):
        pass

    def read_user_metadata(self, item, use_cache=True):
        filename = item.get("filename", None)
        metadata = extra_networks.get_user_metadata(filename, lister=self.lister if use_cache else None)
        desc = metadata.get("description", None)
        if desc is not None:
            item["description"] = desc
        item["user_metadata"] = metadata

    def link_preview(self, filename):
        quoted = urllib.parse.quote(filename.replace('\\', '/'))
        mtime, _ = self.lister.mctime(filename)
        return f"./sd_extra_networks/thumb?filename={quoted}&mtime={mtime}"

    def search_terms_from_path(self, filename, possible_directories=None):
        abspath = os.path.abspath(filename)
        dirs = possible_directories if possible_directories is not None else self.allowed_directories_for_previews()
        for parentdir in dirs:
            parentdir = os.path.dirname(os.path.abspath(parentdir))
            if abspath.startswith(parentdir):
                return os.path.relpath(abspath, parentdir)
        return ""

    def create_html(self, tabname, *, empty=False):
        """The real one renders HTML; here it fills ``items``/``metadata`` the same way."""
        self.lister.reset()
        self.metadata = {}
        items_list = [] if empty else list(self.list_items())
        self.items = {x["name"]: x for x in items_list}
        for item in self.items.values():
            if item.get("metadata"):
                self.metadata[item["name"]] = item["metadata"]
            if "user_metadata" not in item:
                self.read_user_metadata(item)
        return ""

    def create_item(self, name, index=None):
        raise NotImplementedError()

    def list_items(self):
        raise NotImplementedError()

    def allowed_directories_for_previews(self):
        return []

    def get_sort_keys(self, path):
        pth = Path(path)
        mtime, ctime = self.lister.mctime(path)
        return {"date_created": int(mtime), "date_modified": int(ctime), "name": pth.name.lower(), "path": str(pth).lower()}

    def find_preview(self, path):
        for file in sum([[f"{path}.{ext}", f"{path}.preview.{ext}"] for ext in allowed_preview_extensions()], []):
            if self.lister.exists(file):
                return self.link_preview(file)
        return None

    def find_embedded_preview(self, path, name, metadata):
        file = f"{path}.safetensors"
        covers = metadata.get('ssmd_cover_images') if isinstance(metadata, dict) else None
        if self.lister.exists(file) and covers and any(json.loads(covers) if isinstance(covers, str) else covers):
            return f"./sd_extra_networks/cover-images?page={self.extra_networks_tabname}&item={name}"
        return None

    def find_description(self, path):
        for file in [f"{path}.txt", f"{path}.description.txt"]:
            if not self.lister.exists(file):
                continue
            try:
                with open(file, "r", encoding="utf-8", errors="replace") as f:
                    return f.read()
            except OSError:
                pass
        return None

    def create_user_metadata_editor(self, ui, tabname):
        return ui_extra_networks_user_metadata.UserMetadataEditor(ui, tabname, self)


def initialize():
    extra_pages.clear()
