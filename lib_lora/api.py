"""HTTP routes for the LoRA library (FastAPI), independent of the WebUI.

Names in URLs are only ever looked up in the Library's scanned index (``Library.resolve``),
never joined onto a folder, so ``../`` or absolute paths cannot reach other files: they
simply are not found.
"""
from __future__ import annotations

from collections.abc import Callable
from secrets import compare_digest
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from . import service
from .library import AmbiguousName, Library, LoraNotFound

PREFIX = "/lora-workshop/v1"


def basic_auth(api_auth: str) -> Callable[..., bool]:
    """A dependency checking HTTP Basic credentials against ``user:pass[,user2:pass2]``.

    Same rule as the WebUI's ``--api-auth``; the password may itself contain ':' and is
    compared as UTF-8 bytes (``compare_digest`` refuses non-ASCII str).
    """
    credentials: dict[str, bytes] = {}
    for pair in api_auth.split(","):
        user, _, password = pair.partition(":")
        credentials[user] = password.encode("utf-8")

    def lora_workshop_auth(creds: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        expected = credentials.get(creds.username)
        given = creds.password.encode("utf-8")
        # compare even for unknown users so timing does not tell which user names exist
        ok = compare_digest(given, expected if expected is not None else b"\0" + given)
        if expected is None or not ok:
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    return lora_workshop_auth


def _has_route(app: FastAPI, path: str, method: str) -> bool:
    return any(getattr(r, "path", None) == path and method in (getattr(r, "methods", None) or ())
               for r in app.router.routes)


def add_routes(app: FastAPI, library: Callable[[], Library], *, dependencies: list | None = None,
               builtin_compatible: bool = False) -> list[str]:
    """Register the routes on ``app``; returns the paths added (existing ones are left alone).

    ``library`` is called per request so a rebuilt library is picked up.
    ``builtin_compatible`` also serves ``/sdapi/v1/loras`` and ``/sdapi/v1/refresh-loras``
    with the built-in Lora extension's JSON shape (only when that extension is not active).
    """
    deps = list(dependencies or [])
    added: list[str] = []

    def route(path: str, method: str, fn: Callable[..., Any]) -> None:
        if _has_route(app, path, method):
            return
        app.add_api_route(path, fn, methods=[method], dependencies=deps)
        added.append(path)

    def list_loras() -> list[dict[str, Any]]:
        return [service.entry_json(e) for e in library().entries]

    def refresh() -> dict[str, int]:
        lib = library()
        lib.refresh()
        return {"count": len(lib.entries)}

    def get_lora(name: str) -> dict[str, Any]:
        try:
            entry = library().resolve(name)
        except LoraNotFound:
            raise HTTPException(status_code=404, detail=f"Lora not found: {name}") from None
        except AmbiguousName as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        try:
            return service.entry_json(entry, detail=True)
        except OSError as e:  # deleted or unreadable since the last scan
            raise HTTPException(status_code=404, detail=f"Lora not readable: {name} ({e.strerror or e})") from None

    route(f"{PREFIX}/loras", "GET", list_loras)
    route(f"{PREFIX}/refresh", "POST", refresh)
    route(PREFIX + "/loras/{name:path}", "GET", get_lora)

    if builtin_compatible:
        def sdapi_loras() -> list[dict[str, Any]]:
            return [service.builtin_json(e) for e in library().entries]

        def sdapi_refresh() -> None:
            library().refresh()  # the built-in answers null

        route("/sdapi/v1/loras", "GET", sdapi_loras)
        route("/sdapi/v1/refresh-loras", "POST", sdapi_refresh)
    return added
