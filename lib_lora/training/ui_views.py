"""What the training tab shows, as plain HTML and images (no gradio): the dataset summary, messages,
a job's status and the loss plot."""
from __future__ import annotations

import html
import math
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .jobs import format_seconds


def _esc(x: Any) -> str:
    return html.escape(str(x))


def summary_html(summary: dict, problems: list) -> str:
    """The dataset summary as a table, then every problem (errors first)."""
    rows = [("Training images", summary.get("train_images")),
            ("Images x repeats", summary.get("train_images_x_repeats")),
            ("Regularisation images used", f"{summary.get('reg_images_used')} of {summary.get('reg_images')}"),
            ("Samples per epoch", summary.get("samples_per_epoch")),
            ("Steps per epoch (batch size %s)" % summary.get("batch_size"), summary.get("steps_per_epoch"))]
    out = ['<div class="lora-workshop-summary">']
    out.append("<table><tbody>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
               + "</tbody></table>")
    folders = summary.get("folders") or []
    if folders:
        out.append("<table><thead><tr><th>Folder</th><th>Repeats</th><th>Images</th><th>Trigger / caption</th>"
                   "</tr></thead><tbody>")
        for f in folders:
            name = f.get("name") or f.get("path") or ""
            out.append(f"<tr><td>{_esc(name)}{' (reg)' if f.get('is_reg') else ''}</td>"
                       f"<td>{_esc(f.get('repeats', ''))}</td><td>{_esc(f.get('images', ''))}</td>"
                       f"<td>{_esc(f.get('trigger', f.get('caption', '')))}</td></tr>")
        out.append("</tbody></table>")
    buckets = summary.get("buckets") or []
    if buckets:
        out.append("<p>Buckets: " + ", ".join(f"{b['resolution'][0]}x{b['resolution'][1]} ({b['samples']})"
                                               for b in buckets) + "</p>")
    probs = sorted(problems, key=lambda p: 0 if _get(p, "severity") == "error" else 1)
    if probs:
        out.append("<ul class='lora-workshop-problems'>")
        for p in probs:
            sev = _get(p, "severity")
            out.append(f"<li class='lw-{_esc(sev)}'><b>{_esc(sev)}</b>: {_esc(_get(p, 'message'))}</li>")
        out.append("</ul>")
    elif summary.get("ok"):
        out.append("<p class='lw-ok'>No problems found.</p>")
    out.append("</div>")
    return "".join(out)


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def message_html(text: str, error: bool = False) -> str:
    return f"<p class='{'lw-error' if error else 'lw-ok'}'>{_esc(text)}</p>"


def status_html(status: dict | None, model_line: str = "") -> str:
    """The job's state, a progress bar, loss/lr/ETA and where the file went."""
    parts = ["<div class='lora-workshop-status'>"]
    if model_line:
        parts.append(f"<p class='lw-model'>{_esc(model_line)}</p>")
    if not status:
        parts.append("<p>No training job yet.</p></div>")
        return "".join(parts)
    total = max(int(status.get("total") or 0), 1)
    step = int(status.get("step") or 0)
    pct = min(100.0, 100.0 * step / total)
    parts.append(f"<p><b>{_esc(status['name'])}</b>: {_esc(status['state'])} &mdash; step {step}/{total}, "
                 f"epoch {_esc(status.get('epoch'))}</p>")
    parts.append(f"<div class='lw-bar'><div style='width:{pct:.1f}%'></div></div>")
    facts = []
    if status.get("loss") is not None:
        facts.append(f"loss {status['loss']:.4f} (avg {status['avg_loss']:.4f})")
    if status.get("lr") is not None:
        facts.append(f"lr {status['lr']:.2e}")
    if status.get("state") in ("running", "saving") and status.get("eta") is not None:
        facts.append(f"ETA {format_seconds(status['eta'])}")
    if status.get("elapsed"):
        facts.append(f"elapsed {format_seconds(status['elapsed'])}")
    if status.get("paused"):
        facts.append("paused for generation")
    if status.get("time_paused"):
        facts.append(f"{format_seconds(status['time_paused'])} lost to {status.get('pauses')} generation pause(s)")
    if facts:
        parts.append("<p>" + _esc(", ".join(facts)) + "</p>")
    if status.get("live_name") and status.get("state") == "running":
        parts.append(f"<p>In a prompt, <code>&lt;lora:{_esc(status['live_name'])}:1&gt;</code> applies the weights "
                     "trained so far (with the setting \"While a LoRA trains: Generation first\").</p>")
    if status.get("output"):
        parts.append(f"<p>Saved: <code>{_esc(status['output'])}</code></p>")
    if status.get("state_file"):
        parts.append(f"<p>Resumable state: <code>{_esc(status['state_file'])}</code></p>")
    if status.get("error"):
        parts.append(f"<p class='lw-error'>{_esc(status['error'])}</p>")
    if status.get("model_untouched") is False:
        parts.append("<p class='lw-error'>The model changed during training: reload the checkpoint.</p>")
    parts.append("</div>")
    return "".join(parts)


def loss_plot(points: list[list[float]], width: int = 640, height: int = 240) -> Image.Image:
    """Loss per step (light) and its running mean (dark) as an image; no plotting library needed."""
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, width - 12, 12, height - 28
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    pts = [(float(s), float(v)) for s, v in points if v is not None and math.isfinite(v)]
    if not pts:
        d.text((left + 10, top + 10), "no loss values yet", fill=(90, 90, 90), font=font)
        return img
    s0, s1 = pts[0][0], pts[-1][0]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(s: float, v: float) -> tuple[float, float]:
        x = left + (right - left) * ((s - s0) / (s1 - s0) if s1 > s0 else 0.5)
        y = bottom - (bottom - top) * (v - lo) / (hi - lo)
        return x, y

    if len(pts) > 1:
        d.line([xy(s, v) for s, v in pts], fill=(150, 180, 230), width=1)
    window = max(1, len(pts) // 20)
    smooth, acc = [], 0.0
    for i, (s, v) in enumerate(pts):
        acc += v
        if i >= window:
            acc -= pts[i - window][1]
        smooth.append((s, acc / min(i + 1, window)))
    if len(smooth) > 1:
        d.line([xy(s, v) for s, v in smooth], fill=(30, 70, 160), width=2)
    else:
        x, y = xy(*smooth[0])
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 70, 160))
    for v in (hi - pad, lo + pad):
        d.text((4, xy(s0, v)[1] - 6), f"{v:.4f}", fill=(60, 60, 60), font=font)
    d.text((left, bottom + 8), f"step {int(s0)}", fill=(60, 60, 60), font=font)
    label = f"step {int(s1)}"
    d.text((right - 8 * len(label), bottom + 8), label, fill=(60, 60, 60), font=font)
    return img
