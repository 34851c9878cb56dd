"""The "Lora" page of Extra Networks in the WebUI: one card per library file, and the notes editor.

Cards show the preview, the family badge (the notes' "sd version", else the file's own, or
whether it fits the loaded model), the notes' description and the file's metadata; cards for
another model family are left out as the built-in's settings ``lora_show_all`` and
``lora_hide_unknown_for_versions`` say (with the built-in disabled: as saved, else its
defaults).  The prompt a card adds uses the notes' activation text and preferred weight, else
the WebUI's default multiplier.  The notes are the ``<file>.json`` the built-in Lora uses; their editor also lists
the training tags (a click toggles one in the activation text) and a random prompt from them.
"""
from __future__ import annotations

import html
import os
from typing import Any

from modules import shared, ui_extra_networks, ui_extra_networks_user_metadata

from .. import cards, editor_tags, families
from .. import metadata as lora_metadata
from ..library import prompt_name

PAGE_TITLE = "Lora"  # same tab (and element ids) as the built-in, which it replaces
SHOWN_TAGS = 24       # training tags the notes editor lists


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
            item = self._item(entry, names[entry.relname], index, enable_filter=True)
            if item is not None:
                yield item

    def create_item(self, name, index=None, enable_filter=True):
        """One card; None for a name that is no file, or (``enable_filter``) a card the page hides.
        The WebUI asks with ``enable_filter=False`` to redraw one card after its notes are saved."""
        try:
            entry = self.workshop.library.resolve(name)
        except LookupError:
            return None
        return self._item(entry, name, index, enable_filter)

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

    def _hidden(self, fam: cards.CardFamily) -> bool:
        """The built-in's filter settings; with it disabled, the WebUI's options still hold the values
        config.json has for them, and the built-in's defaults stand in for the rest."""
        mm = self.workshop.runtime.model_map
        host = self.workshop.host
        return cards.card_hidden(fam, mm.family if mm is not None else None,
                                 bool(host.option("lora_show_all")),
                                 host.option("lora_hide_unknown_for_versions"))

    def _item(self, entry, name: str, index, enable_filter: bool) -> dict | None:
        ws = self.workshop
        filename = str(entry.path)
        base = os.path.splitext(filename)[0]
        # the notes first: their "sd version" decides the badge and whether the card is shown
        notes = {"filename": filename}
        self.read_user_metadata(notes)  # the WebUI's reader: "user_metadata", and "description" if they have one
        stated = cards.stated_family(notes["user_metadata"])
        fam = cards.card_family(entry, ws.runtime.model_map, ws.fits, stated)
        if enable_filter and self._hidden(fam):
            return None
        metadata = lora_metadata.decoded_metadata(entry.metadata)
        item = {
            "name": name,
            "filename": filename,
            "shorthash": (entry.known_hash() or "")[:12],
            "preview": self.find_preview(base) or self.find_embedded_preview(base, name, metadata),
            "description": self._description(entry, base),
            "search_terms": cards.card_search_terms(entry, fam.family),
            "local_preview": f"{base}.{shared.opts.samples_format}",
            "metadata": metadata,
            # sort keys become data-sort-* attributes on the card: style.css draws the badge from them
            "sort_keys": {"default": index if index is not None else 0, **self.get_sort_keys(filename),
                          **fam.sort_keys()},
            "sd_version": families.display(fam.family, unknown="Unknown"),
        }
        item.update(notes)
        token_name = prompt_name(ws.library, entry,
                                 prefer_filename=ws.host.option("lora_preferred_name") == "Filename")
        prompt = cards.card_prompt(token_name, item["user_metadata"])
        item["prompt"] = prompt_js(prompt)
        item["negative_prompt"] = ui_extra_networks.quote_js(prompt.negative)
        return item


def prompt_js(prompt: cards.CardPrompt) -> str:
    """The card's prompt as the JavaScript expression the WebUI's card click evaluates.  Without a
    preferred weight it reads the WebUI's "Default multiplier for extra networks" from the browser's
    settings at click time, as the built-in's cards do (not our token default, which only applies
    to ``<lora:name>`` written without a weight)."""
    quote = ui_extra_networks.quote_js
    if prompt.weight is not None:
        return quote(prompt.text(cards.format_weight(prompt.weight)))
    head, tail = quote(f"<lora:{prompt.name}:"), quote(">" + prompt.tail)
    return f"{head} + opts.extra_networks_default_multiplier + {tail}"


class LoraMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    """Edits the ``<file>.json`` notes the built-in uses (same keys, other keys preserved)."""

    select_sd_version = None  # the "Stable Diffusion version" dropdown, made in create_editor
    taginfo = None            # the clickable "Training dataset tags"

    def save_lora_user_metadata(self, name, desc, sd_version, activation_text, preferred_weight, negative_text,
                                notes):
        """The built-in's fields in its order; "sd version" keeps its spellings (we add "SD3")."""
        user_metadata = self.get_user_metadata(name)
        user_metadata["description"] = desc
        known = sd_version in cards.SD_VERSIONS
        user_metadata[cards.NOTES_VERSION_KEY] = sd_version if known else cards.UNKNOWN_VERSION
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
        return table  # the training tags are the editor's clickable list

    def _tags(self, name) -> list[tuple[str, int]]:
        return editor_tags.editor_tags(self.page.items.get(name, {}).get("metadata") or {})

    def random_prompt(self, name) -> str:
        return editor_tags.random_prompt(self._tags(name))

    def put_values_into_components(self, name):
        user_metadata = self.get_user_metadata(name)
        values = super().put_values_into_components(name)
        try:
            weight = float(user_metadata.get("preferred weight") or 0.0)
        except (TypeError, ValueError):
            weight = 0.0
        item = self.page.items.get(name, {})
        tags = self._tags(name)
        return [*values[0:5], item.get("sd_version", cards.UNKNOWN_VERSION),
                _update(value=[(t, str(n)) for t, n in tags[:SHOWN_TAGS]], visible=bool(tags)),
                user_metadata.get("activation text", ""), weight, user_metadata.get("negative text", ""),
                _update(visible=bool(tags)), _update(value=editor_tags.random_prompt(tags), visible=bool(tags))]

    def create_extra_default_items_in_left_column(self):
        import gradio as gr  # only in the real WebUI

        # the card's family (the notes' choice or the file's); Unknown: decided from the file
        self.select_sd_version = gr.Dropdown(choices=list(cards.SD_VERSIONS), value=cards.UNKNOWN_VERSION,
                                             label="Stable Diffusion version", interactive=True)

    def create_editor(self):
        import gradio as gr  # only in the real WebUI

        self.create_default_editor_elems()
        self.taginfo = gr.HighlightedText(label="Training dataset tags")
        self.edit_activation_text = gr.Textbox(label="Activation text", info="added to the prompt with the LoRA")
        self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="0 = the WebUI's default multiplier",
                                                 minimum=0.0, maximum=2.0, step=0.01)
        self.edit_negative_text = gr.Textbox(label="Negative prompt", info="added to the negative prompt")
        with gr.Row() as random_row:
            with gr.Column(scale=8):
                random_text = gr.Textbox(label="Random prompt", lines=4, max_lines=4, interactive=False)
            with gr.Column(scale=1, min_width=120):
                random_button = gr.Button("Generate", size="lg")
        self.edit_notes = gr.TextArea(label="Notes", lines=4)

        def tag_clicked(activation_text, evt):
            return editor_tags.toggle_tag(activation_text or "", str(evt.value[0]))  # a (tag, count) pair

        # gradio passes the click's SelectData by this hint; a real class, as this module's annotations are strings
        tag_clicked.__annotations__ = {"evt": gr.SelectData}

        self.taginfo.select(fn=tag_clicked, inputs=[self.edit_activation_text], outputs=[self.edit_activation_text],
                            show_progress="hidden")
        random_button.click(fn=self.random_prompt, inputs=[self.edit_name_input], outputs=[random_text],
                            show_progress="hidden")
        self.create_default_buttons()
        self.button_edit.click(
            fn=self.put_values_into_components, inputs=[self.edit_name_input],
            outputs=[self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                     self.select_sd_version, self.taginfo, self.edit_activation_text, self.slider_preferred_weight,
                     self.edit_negative_text, random_row, random_text],
        ).then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        self.setup_save_handler(self.button_save, self.save_lora_user_metadata,
                                [self.edit_description, self.select_sd_version, self.edit_activation_text,
                                 self.slider_preferred_weight, self.edit_negative_text, self.edit_notes])


def _update(**changes: Any) -> dict:
    import gradio as gr  # only in the real WebUI (tests: tests/gradio_standin.py)

    return gr.update(**changes)
