"""HTTP routes for the LoRA library, training and tool jobs (FastAPI), independent of the WebUI.

Names in URLs are only ever looked up in the Library's scanned index (``Library.resolve``),
never joined onto a folder, so ``../`` or absolute paths cannot reach other files: they
simply are not found.
"""
from __future__ import annotations

from collections.abc import Callable
from secrets import compare_digest
from typing import Any, Optional

from fastapi import Body, Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .payloads import builtin_json, entry_json
from .library import AmbiguousName, Library, LoraNotFound

PREFIX = "/lora-workshop/v1"
KEEP_TIMEOUT = 600.0  # seconds a "keep this state" request waits for the job's next step boundary


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


class _Registrar:
    """Adds routes behind the given dependencies (auth), skipping paths something else already serves."""

    def __init__(self, app: FastAPI, dependencies: list | None):
        self.app, self.deps, self.added = app, list(dependencies or []), []

    def __call__(self, path: str, method: str, fn: Callable[..., Any]) -> None:
        if _has_route(self.app, path, method):
            return
        self.app.add_api_route(path, fn, methods=[method], dependencies=self.deps)
        self.added.append(path)


def add_routes(app: FastAPI, library: Callable[[], Library], *, dependencies: list | None = None,
               builtin_compatible: bool = False) -> list[str]:
    """Register the routes on ``app``; returns the paths added (existing ones are left alone).

    ``library`` is called per request so a rebuilt library is picked up.
    ``builtin_compatible`` also serves ``/sdapi/v1/loras`` and ``/sdapi/v1/refresh-loras``
    with the built-in Lora extension's JSON shape (only when that extension is not active).
    """
    route = _Registrar(app, dependencies)
    added = route.added

    def list_loras() -> list[dict[str, Any]]:
        return [entry_json(e) for e in library().entries]

    def refresh() -> dict[str, int]:
        lib = library()
        lib.refresh()
        return {"count": len(lib.entries)}

    def get_lora(name: str) -> dict[str, Any]:
        try:
            entry = library().resolve_fresh(name)
        except LoraNotFound:
            raise HTTPException(status_code=404, detail=f"Lora not found: {name}") from None
        except AmbiguousName as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        try:
            return entry_json(entry, detail=True)
        except OSError as e:  # deleted or unreadable since the last scan
            raise HTTPException(status_code=404, detail=f"Lora not readable: {name} ({e.strerror or e})") from None

    route(f"{PREFIX}/loras", "GET", list_loras)
    route(f"{PREFIX}/refresh", "POST", refresh)
    route(PREFIX + "/loras/{name:path}", "GET", get_lora)

    if builtin_compatible:
        def sdapi_loras() -> list[dict[str, Any]]:
            return [builtin_json(e) for e in library().entries]

        def sdapi_refresh() -> None:
            library().refresh()  # the built-in answers null

        route("/sdapi/v1/loras", "GET", sdapi_loras)
        route("/sdapi/v1/refresh-loras", "POST", sdapi_refresh)
    return added


# -- training ------------------------------------------------------------------------------------------


def add_training_routes(app: FastAPI, runner: Callable[[], Any], *, dependencies: list | None = None) -> list[str]:
    """Training jobs over HTTP; ``runner`` returns the ``training.jobs.JobRunner`` (called per request).

    - ``POST {PREFIX}/train`` body: a training request (see ``request.build_request``) -> ``{"id", "name",
      "state", "total"}`` at once; 400 bad request / dataset error (named), 409 a job is running,
      the output exists or the loaded model cannot be trained on.
    - ``POST {PREFIX}/train/validate`` same body -> ``{"summary", "problems"}`` (nothing starts).
    - ``POST {PREFIX}/train/export`` same body -> ``{"config_toml", "dataset_toml", "notes"}``: the request
      as kohya's two files (a body may itself hold ``config_toml``/``dataset_toml``: they are imported).
    - ``GET {PREFIX}/train`` -> ``{"active": id | null, "jobs": [{id, name, state, step, total}]}``.
    - ``GET {PREFIX}/train/{id}`` -> the job's status (``Job.status``) with ``samples[i].url``.
    - ``POST {PREFIX}/train/{id}/stop`` body ``{"save": bool}`` (optional) -> the status.
    - ``POST {PREFIX}/train/{id}/keep`` -> ``{"file", "step"}`` once the weights of the next step boundary
      are saved as ``NAME-step00001234.safetensors`` (the job goes on); 409 when the job is not training,
      ends first or the file exists and is not the job's; 504 if no step boundary came within 10 minutes
      (the file is still written there).
    - ``GET {PREFIX}/train/{id}/samples/{n}`` -> sample image ``n`` (only files the job wrote).
    File paths in answers are relative to the LoRA folder; nothing outside it is ever written.
    """
    from fastapi.responses import FileResponse

    from .training.problems import DatasetError
    from .training.errors import JobError
    from .training.kohya_config import export_files

    route = _Registrar(app, dependencies)
    added = route.added

    def fail(e: Exception) -> HTTPException:
        if isinstance(e, JobError):
            return HTTPException(status_code=e.status, detail=str(e))
        return HTTPException(status_code=400, detail=str(e))  # DatasetError: the message names the file

    def status(job) -> dict[str, Any]:
        r = runner()
        out = job.status(relative_to=r.host.output_dir())
        for s in out["samples"]:
            s["url"] = f"{PREFIX}/train/{job.id}/samples/{s['index']}"
        return out

    def get_job(job_id: str):
        try:
            return runner().get(job_id)
        except JobError as e:
            raise fail(e) from None

    def train(body: dict = Body(...)) -> dict[str, Any]:
        try:
            job = runner().start(body, remote=True)
        except (JobError, DatasetError) as e:
            raise fail(e) from None
        return {"id": job.id, "name": job.name, "state": job.state, "total": job.total}

    def validate(body: dict = Body(...)) -> dict[str, Any]:
        try:
            summary, problems = runner().validate(body, remote=True)
        except (JobError, DatasetError) as e:
            raise fail(e) from None
        return {"summary": summary, "problems": [p.to_dict() for p in problems]}

    def export(body: dict = Body(...)) -> dict[str, Any]:
        try:
            req = runner().request(body, remote=True)
            return {**export_files(req.config), "notes": req.notes}
        except (JobError, DatasetError) as e:
            raise fail(e) from None

    def list_jobs() -> dict[str, Any]:
        r = runner()
        active = r.active()
        return {"active": active.id if active else None,
                "jobs": [{"id": j.id, "name": j.name, "state": j.state, "step": j.step, "total": j.total}
                         for j in r.jobs()]}

    def job_status(job_id: str) -> dict[str, Any]:
        return status(get_job(job_id))

    def stop(job_id: str, body: Optional[dict] = Body(None)) -> dict[str, Any]:
        job = get_job(job_id)
        save = (body or {}).get("save", False)
        if not isinstance(save, bool):
            raise HTTPException(status_code=400, detail="save: expected true or false")
        job.request_stop(save=save)
        return status(job)

    def keep(job_id: str) -> dict[str, Any]:
        job = get_job(job_id)
        try:
            request = job.request_keep()
            path = request.wait(KEEP_TIMEOUT)
        except JobError as e:
            raise fail(e) from None
        except TimeoutError as e:
            raise HTTPException(status_code=504, detail=str(e)) from None
        folder = runner().host.output_dir().resolve()
        resolved = path.resolve()
        return {"file": resolved.relative_to(folder).as_posix() if folder in resolved.parents else path.name,
                "step": request.step}

    def sample(job_id: str, n: int):
        job = get_job(job_id)
        paths = job.sample_paths()
        if not 0 <= n < len(paths):
            raise HTTPException(status_code=404, detail=f"no sample {n} for job {job_id}")
        path = paths[n].resolve()
        folder = runner().host.samples_dir(job).resolve()
        if folder not in path.parents or not path.is_file():
            raise HTTPException(status_code=404, detail=f"sample {n} is no longer available")
        return FileResponse(str(path), media_type="image/png")

    route(f"{PREFIX}/train", "POST", train)
    route(f"{PREFIX}/train/validate", "POST", validate)
    route(f"{PREFIX}/train/export", "POST", export)
    route(f"{PREFIX}/train", "GET", list_jobs)
    route(PREFIX + "/train/{job_id}", "GET", job_status)
    route(PREFIX + "/train/{job_id}/stop", "POST", stop)
    route(PREFIX + "/train/{job_id}/keep", "POST", keep)
    route(PREFIX + "/train/{job_id}/samples/{n}", "GET", sample)
    return added


# -- tools ---------------------------------------------------------------------------------------------


def add_tool_routes(app: FastAPI, runner: Callable[[], Any], *, dependencies: list | None = None) -> list[str]:
    """The offline tools as jobs; ``runner`` returns the ``tools.jobs.ToolRunner`` (called per request).

    - ``GET {PREFIX}/tools`` -> each tool's options as the API takes them (name, type, default, choices, kind).
    - ``POST {PREFIX}/tools/{resize|merge|bake|extract|convert}`` body: the tool's options by name (the
      command line's, with LoRAs and checkpoints given by name and ``out`` a file name) -> ``{"id", "state"}``
      at once; 400 a bad value, 404 an unknown tool / LoRA / checkpoint, 409 an output that exists
      (without ``force``), is an input or a link, or an ambiguous name. Each ``detail`` starts with the
      error's name (``OptionError: ...``).
    - ``GET {PREFIX}/tools/jobs`` -> ``{"jobs": [status, ...]}``, newest first.
    - ``GET {PREFIX}/tools/jobs/{id}`` -> the job's status (``ToolJob.status``): state, done/total, eta,
      output (relative to its folder), error (one line, named: ``FamilyMismatchError: ...``).
    - ``POST {PREFIX}/tools/jobs/{id}/stop`` -> the status; the job stops at its next step.
    """
    from .tools.jobs import ToolJobError
    from .tools.options import REQUIRED, TOOLS

    route = _Registrar(app, dependencies)

    def get_job(job_id: str):
        try:
            return runner().get(job_id)
        except ToolJobError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None

    def describe() -> dict[str, Any]:
        return {t.name: {"help": t.help, "options": [
            {"name": o.name, "type": "list" if o.many else o.type.__name__, "kind": o.kind or None,
             "required": o.default is REQUIRED, "default": None if o.default is REQUIRED else o.default,
             "choices": list(o.choices) or None, "help": o.help} for o in t.on("api")]} for t in TOOLS.values()}

    def start(tool: str, body: dict = Body(...)) -> dict[str, Any]:
        try:
            job = runner().start(tool, body)
        except ToolJobError as e:
            raise HTTPException(status_code=e.status, detail=str(e)) from None
        return {"id": job.id, "state": job.state}

    def list_jobs() -> dict[str, Any]:
        return {"jobs": [j.status() for j in runner().jobs()]}

    def job_status(job_id: str) -> dict[str, Any]:
        return get_job(job_id).status()

    def stop(job_id: str) -> dict[str, Any]:
        job = get_job(job_id)
        job.request_stop()
        return job.status()

    route(f"{PREFIX}/tools", "GET", describe)
    route(f"{PREFIX}/tools/jobs", "GET", list_jobs)
    route(PREFIX + "/tools/jobs/{job_id}", "GET", job_status)
    route(PREFIX + "/tools/jobs/{job_id}/stop", "POST", stop)
    route(PREFIX + "/tools/{tool}", "POST", start)
    return route.added
