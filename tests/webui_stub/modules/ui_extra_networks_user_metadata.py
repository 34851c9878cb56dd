"""Stub of modules/ui_extra_networks_user_metadata.py (WebUI v1.10.1) without the gradio parts.

The real class builds its editor popup with gradio in create_ui()/create_editor(); the data
methods below keep their real names and return shapes.
"""
import html
import json
import os.path

from modules import ui_extra_networks


class UserMetadataEditor:
    def __init__(self, ui, tabname, page):
        self.ui = ui
        self.tabname = tabname
        self.page = page
        self.id_part = f"{self.tabname}_{self.page.extra_networks_tabname}_edit_user_metadata"

    def get_user_metadata(self, name):
        item = self.page.items.get(name, {})
        user_metadata = item.get('user_metadata', None)
        if not user_metadata:
            user_metadata = {'description': item.get('description', '')}
            item['user_metadata'] = user_metadata
        return user_metadata

    def create_extra_default_items_in_left_column(self):
        pass  # the real create_default_editor_elems calls it under the description and file table

    def get_card_html(self, name):
        item = self.page.items.get(name, {})
        preview_url = item.get("preview", None)
        return f"<div class='card standalone-card-preview'><img src='{html.escape(preview_url or '')}'></div>"

    def relative_path(self, path):
        for parent_path in self.page.allowed_directories_for_previews():
            if ui_extra_networks.path_is_parent(parent_path, path):
                return os.path.relpath(path, parent_path)
        return os.path.basename(path)

    def get_metadata_table(self, name):
        item = self.page.items.get(name, {})
        filename = item["filename"]
        stats = os.stat(filename)
        return [('Filename: ', self.relative_path(filename)), ('File size: ', str(stats.st_size)),
                ('Hash: ', item.get("shorthash", None))]

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        params = self.get_metadata_table(name)
        table = '<table class="file-metadata">' + "".join(
            f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in params if v is not None) + '</table>'
        return html.escape(name), user_metadata.get('description', ''), table, self.get_card_html(name), user_metadata.get('notes', '')

    def write_user_metadata(self, name, metadata):
        item = self.page.items.get(name, {})
        basename, ext = os.path.splitext(item.get("filename", None))
        with open(basename + '.json', "w", encoding="utf8") as file:
            json.dump(metadata, file, indent=4, ensure_ascii=False)

    def save_user_metadata(self, name, desc, notes):
        user_metadata = self.get_user_metadata(name)
        user_metadata["description"] = desc
        user_metadata["notes"] = notes
        self.write_user_metadata(name, user_metadata)
