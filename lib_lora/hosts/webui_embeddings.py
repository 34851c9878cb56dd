"""Bundled textual-inversion embeddings (``bundled.py``) in the WebUI's embedding database.

What the built-in Lora (v1.10.1) does, and so we do: at each ``<lora:>`` activation, which runs before the
prompt is encoded, the embeddings the previous activation registered are taken out of
``sd_hijack.model_hijack.embedding_db``, then those of every file now loaded are registered under their
names.  A name the database already holds (an embedding from the embeddings folder) keeps it, and one whose
width does not fit the loaded model is skipped and listed in the database's ``skipped_embeddings``
(what ``/sdapi/v1/embeddings`` shows as skipped) until the next activation.  A registered embedding's short hash, written into
``TI hashes`` by the prompt encoder, is the LoRA's name as written (empty when the built-in's
``lora_bundled_ti_to_infotext`` is off).  We also take them out at deactivate, so nothing stays registered
between generations.
"""
from __future__ import annotations

from typing import Any, Callable

from modules import devices, sd_hijack
from modules.textual_inversion.textual_inversion import Embedding

from ..bundled import BundledEmbedding
from .webui_model import model_family, token_widths

OPT_TO_INFOTEXT = "lora_bundled_ti_to_infotext"  # the built-in's setting (webui_settings.BUILTIN_DEFAULTS)


class _LoraNameHash(str):
    """The short hash ``TI hashes`` shows for a bundled embedding: the LoRA's name, read as a string
    only when the infotext is written, so the setting applies as it stands then."""

    def __new__(cls, name: str, enabled: Callable[[], bool]):
        obj = super().__new__(cls, name)
        obj._enabled = enabled
        return obj

    def __str__(self) -> str:
        return str.__str__(self) if self._enabled() else ""


class BundledEmbeddings:
    """The embeddings one Workshop has registered in the WebUI's database."""

    def __init__(self, option: Callable[[str, Any], Any]):
        self._option = option
        self._registered: dict[str, Embedding] = {}
        self._skipped: dict[str, Embedding] = {}

    @staticmethod
    def _db() -> Any:
        return sd_hijack.model_hijack.embedding_db

    def clear(self, sd_model: Any) -> None:
        """Take ours out of the database (a name someone else has registered since is left alone).

        Without a model nothing can tokenize their names, so they are kept for the next call that has one
        (a model load reloads the database, and then none of them is there any more)."""
        if sd_model is None:
            return
        db = self._db()
        for name, emb in list(self._registered.items()):
            if db.word_embeddings.get(name) is emb:
                db.register_embedding_by_name(None, sd_model, name)
        self._registered.clear()

    def _unlist_skipped(self) -> None:
        skipped = self._db().skipped_embeddings
        for name, emb in self._skipped.items():
            if skipped.get(name) is emb:
                del skipped[name]
        self._skipped.clear()

    def register(self, sd_model: Any, embeddings: list[tuple[str, BundledEmbedding]]) -> list[str]:
        """Register each loaded file's embeddings; messages for those skipped."""
        self._unlist_skipped()      # the last activation's, listed until now
        if not embeddings or sd_model is None:
            return []
        db = self._db()
        family = model_family(sd_model)
        widths = token_widths(sd_model, family) if family else None
        messages = []
        for lora, bundled in embeddings:
            name = bundled.name
            if name in self._registered:
                messages.append(f"{lora}: bundled embedding {name!r} is also bundled in another LoRA of this "
                                "prompt — the first one is used")
                continue
            if name in db.word_embeddings:
                messages.append(f"{lora}: bundled embedding {name!r} skipped — an embedding of that name is "
                                "already loaded from the embeddings folder")
                continue
            reason = bundled.misfit(widths) if widths is not None else \
                f"embedding {name!r}: the loaded model's token-embedding width is unknown"
            if reason:
                messages.append(f"{lora}: {reason} — skipped")
                if name not in db.skipped_embeddings:   # as the built-in lists it (never on the device: unused)
                    self._skipped[name] = db.skipped_embeddings[name] = self._embedding(lora, bundled, "cpu")
                continue
            emb = self._embedding(lora, bundled, devices.device)
            db.register_embedding(emb, sd_model)
            self._registered[name] = emb
        return messages

    def folder_embedding(self, word: str) -> str | None:
        """The name of a loaded embedding other than ours that a prompt's ``word`` would take (the database
        matches a prompt's lower-cased tokens), or None."""
        for name in self._db().word_embeddings:
            if name.lower() == word.lower() and name not in self._registered:
                return name
        return None

    def _embedding(self, lora: str, bundled: BundledEmbedding, device: Any) -> Embedding:
        vec = {k: v.to(device) for k, v in bundled.vectors.items()}
        emb = Embedding(vec[""] if "" in vec else vec, bundled.name)
        emb.shape, emb.vectors = bundled.width, bundled.count
        # the Textual Inversion page reads every registered embedding's filename as a path (None fails its
        # listing); the built-in gives "<LoRA file>/<name>", which exists nowhere, so no preview is found
        emb.filename = f"{bundled.source or lora}/{bundled.name}"
        emb.shorthash = _LoraNameHash(lora, lambda: bool(self._option(OPT_TO_INFOTEXT)))
        return emb
