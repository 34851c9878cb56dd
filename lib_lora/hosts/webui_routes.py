"""LoRA Workshop's HTTP routes in the WebUI (``--api``): the library's, training's and the tools',
registered in one place behind the WebUI's own ``--api-auth``."""
from __future__ import annotations

from typing import Any

from modules import shared

from . import webui_tools, webui_training
from .webui_builtin import builtin_lora_active


def api_auth_dependencies(app: Any) -> list:
    """Dependencies enforcing --api-auth on our routes.

    Reuses the WebUI's own ``Api.auth`` when an Api object was created (--api / --nowebui):
    it is reachable as the bound dependency of its routes.  Otherwise the same check is
    rebuilt from cmd_opts.api_auth.
    """
    from fastapi import Depends

    from ..api import basic_auth

    api_auth = getattr(shared.cmd_opts, "api_auth", None)
    if not api_auth:
        return []
    for route in getattr(getattr(app, "router", None), "routes", []):
        dependant = getattr(route, "dependant", None)
        for dep in getattr(dependant, "dependencies", []) or []:
            call = getattr(dep, "call", None)
            owner = getattr(call, "__self__", None)
            if getattr(call, "__name__", "") == "auth" and isinstance(getattr(owner, "credentials", None), dict):
                return [Depends(call)]
    return [Depends(basic_auth(api_auth))]


def add_api_routes(app: Any, workshop: Any) -> list[str]:
    """on_app_started: every route, for the process' ``webui.Workshop``; the paths added."""
    from ..api import add_routes, add_tool_routes, add_training_routes
    deps = api_auth_dependencies(app)
    added = add_routes(app, lambda: workshop.library, dependencies=deps, builtin_compatible=not builtin_lora_active())
    added += add_training_routes(app, lambda: webui_training.get_runner(workshop), dependencies=deps)
    return added + add_tool_routes(app, lambda: webui_tools.get_runner(workshop), dependencies=deps)
