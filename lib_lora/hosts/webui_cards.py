"""The "Lora" page of Extra Networks in the WebUI: one card per library file, and the notes editor.

Cards show the preview, the family badge (the file's own, or whether it fits the loaded model),
the notes' description and the file's metadata; the prompt a card adds uses the notes'
activation text and preferred weight.  The notes are the ``<file>.json`` the built-in Lora uses.
"""
from __future__ import annotations

import html
import os
from typing import Any

from modules import shared, ui_extra_networks, ui_extra_networks_user_metadata

from .. import cards, families
from .. import metadata as lora_metadata
from ..library import prompt_name

PAGE_TITLE = "Lora"  # same tab (and element ids) as the built-in, which it replaces


class LoraPage(ui_extra_networks.ExtraNetworksPage):
    """The "Lora" tab of Extra Networks: cards with preview, family badge, notes and metadata."""

    def __init__(self, workshop: Any):  # the webui.Workshop
        super().__init__(PAGE_TITLE)
        self.workshop = workshop

    def refresh(self):
        self.workshop.library.refresh()

    def list_items(self):
        # a snapshot (refresh may swap the list); training state files sit beside LoRAs but are not ones
        entries = list(self.workshop.library.entries)
        self.workshop.fits.prune({e.path for e in entries})
        names = cards.display_names(entries)
        for index, entry in enumerate(entries):
            yield self._item(entry, names[entry.relname], index)

    def create_item(self, name, index=None, enable_filter=True):
        try:
            entry = self.workshop.library.resolve(name)
        except LookupError:
            return None
        return self._item(entry, name, index)

    def allowed_directories_for_previews(self):
        return [str(r) for r in self.workshop.library.roots]

    def create_user_metadata_editor(self, ui, tabname):
        return LoraMetadataEditor(ui, tabname, self)

    def _description(self, entry, base: str) -> str | None:
        """The notes' description; an unreadable file's error goes first (escaped: cards insert it as HTML)."""
        text = self.find_description(base)
        if not entry.header_error:
            return text
        error = f'<span class="lora-workshop-error">{html.escape(entry.header_error)}</span>'
        return error + (f"<br>{text}" if text else "")

    def _item(self, entry, name: str, index) -> dict:
        ws = self.workshop
        filename = str(entry.path)
        base = os.path.splitext(filename)[0]
        metadata = lora_metadata.decoded_metadata(entry.metadata)
        fam = cards.card_family(entry, ws.runtime.model_map, ws.fits)
        item = {
            "name": name,
            "filename": filename,
            "shorthash": (entry.known_hash() or "")[:12],
            "preview": self.find_preview(base) or self.find_embedded_preview(base, name, metadata),
            "description": self._description(entry, base),
            "search_terms": cards.card_search_terms(entry),
            "local_preview": f"{base}.{shared.opts.samples_format}",
            "metadata": metadata,
            # sort keys become data-sort-* attributes on the card: style.css draws the badge from them
            "sort_keys": {"default": index if index is not None else 0, **self.get_sort_keys(filename),
                          **fam.sort_keys()},
            "sd_version": families.display(fam.family, unknown="Unknown"),
        }
        self.read_user_metadata(item)
        token_name = prompt_name(ws.library, entry,
                                         prefer_filename=ws.host.option("lora_preferred_name", "") == "Filename")
        prompt, negative = cards.card_prompts(token_name, item["user_metadata"], ws.default_weight())
        item["prompt"] = ui_extra_networks.quote_js(prompt)
        item["negative_prompt"] = ui_extra_networks.quote_js(negative)
        return item


class LoraMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    """Edits the ``<file>.json`` notes the built-in uses (same keys, other keys preserved)."""

    def save_lora_user_metadata(self, name, desc, activation_text, preferred_weight, negative_text, notes):
        user_metadata = self.get_user_metadata(name)
        user_metadata["description"] = desc
        user_metadata["activation text"] = activation_text
        user_metadata["preferred weight"] = preferred_weight
        user_metadata["negative text"] = negative_text
        user_metadata["notes"] = notes
        self.write_user_metadata(name, user_metadata)

    def get_metadata_table(self, name):
        table = list(super().get_metadata_table(name))
        item = self.page.items.get(name, {})
        metadata = item.get("metadata") or {}
        table.append(("Family:", html.escape(item.get("sd_version", "Unknown"))))
        # metadata comes from the file: escape it, the WebUI puts table cells into HTML as they are
        table += [(html.escape(label) + ":", html.escape(text)) for label, text in lora_metadata.metadata_summary(metadata)]
        tags = lora_metadata.tag_frequency(metadata, top=24)
        if tags:
            table.append(("Top tags:", html.escape(", ".join(f"{t} ({n})" for t, n in tags))))
        return table

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        values = super().put_values_into_components(name)
        try:
            weight = float(user_metadata.get("preferred weight") or 0.0)
        except (TypeError, ValueError):
            weight = 0.0
        return [*values[0:5], user_metadata.get("activation text", ""), weight, user_metadata.get("negative text", "")]

    def create_editor(self):
        import gradio as gr  # only in the real WebUI

        self.create_default_editor_elems()
        self.edit_activation_text = gr.Textbox(label="Activation text", info="added to the prompt with the LoRA")
        self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="0 = the default weight",
                                                 minimum=0.0, maximum=2.0, step=0.01)
        self.edit_negative_text = gr.Textbox(label="Negative prompt", info="added to the negative prompt")
        self.edit_notes = gr.TextArea(label="Notes", lines=4)
        self.create_default_buttons()
        self.button_edit.click(
            fn=self.put_values_into_components, inputs=[self.edit_name_input],
            outputs=[self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                     self.edit_activation_text, self.slider_preferred_weight, self.edit_negative_text],
        ).then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        self.setup_save_handler(self.button_save, self.save_lora_user_metadata,
                                [self.edit_description, self.edit_activation_text, self.slider_preferred_weight,
                                 self.edit_negative_text, self.edit_notes])
