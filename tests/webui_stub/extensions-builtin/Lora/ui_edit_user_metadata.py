"""Stub of the built-in Lora extension's card editor (WebUI v1.10.1, extensions-builtin/Lora/ui_edit_user_metadata.py)
without its gradio parts.

Only ``get_metadata_table`` is mirrored, at the level of what it reads and shows: the real one
reads the item's decoded metadata (JSON values already parsed, as the WebUI's safetensors reader
does for values starting with "{") and adds rows for the output name, model, clip skip and module
(unless "None"), the training date, one "Resolution:"/"Resolutions:" row from ``ss_bucket_info``'s
"buckets" (each bucket's [w, h] shown as HxW, most images first, four at most), and the dataset
size from ``ss_dataset_dirs``.  A ``ss_bucket_info`` that is not an object with "buckets" gives no
resolution row.
"""
import datetime
import html

from modules import ui_extra_networks_user_metadata


class LoraUserMetadataEditor(ui_extra_networks_user_metadata.UserMetadataEditor):
    def get_metadata_table(self, name):
        table = super().get_metadata_table(name)
        metadata = self.page.items.get(name, {}).get("metadata") or {}

        for key, label in (("ss_output_name", "Output name:"), ("ss_sd_model_name", "Model:"),
                           ("ss_clip_skip", "Clip skip:"), ("ss_network_module", "Kohya module:")):
            value = metadata.get(key)
            if value is not None and str(value) != "None":
                table.append((label, html.escape(value)))

        started = metadata.get("ss_training_started_at")
        if started:
            when = datetime.datetime.fromtimestamp(float(started), datetime.timezone.utc)
            table.append(("Date trained:", when.strftime("%Y-%m-%d %H:%M")))

        bucket_info = metadata.get("ss_bucket_info")
        if bucket_info and "buckets" in bucket_info:
            totals = {}
            for bucket in bucket_info["buckets"].values():
                w, h = bucket["resolution"]
                totals[f"{h}x{w}"] = totals.get(f"{h}x{w}", 0) + int(bucket["count"])
            ordered = sorted(totals, key=totals.get, reverse=True)
            text = html.escape(", ".join(ordered[:4])) + (", ..." if len(ordered) > 4 else "")
            table.append(("Resolutions:" if len(ordered) > 1 else "Resolution:", text))

        images = sum(int(d.get("img_count", 0)) for d in (metadata.get("ss_dataset_dirs") or {}).values())
        if images:
            table.append(("Dataset size:", images))
        return table
