"""Stub of modules/api/api.py (WebUI v1.10.1): the Api object and its --api-auth check.

The WebUI creates ``Api(app, queue_lock)`` when started with --api (or --nowebui); every
route it adds depends on ``self.auth`` when --api-auth is set.  The instance is not stored
anywhere global.
"""
import time
from secrets import compare_digest
from threading import Lock

from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import shared


class Api:
    def __init__(self, app: FastAPI, queue_lock: Lock):
        if shared.cmd_opts.api_auth:
            self.credentials = {}
            for auth in shared.cmd_opts.api_auth.split(","):
                user, password = auth.split(":")
                self.credentials[user] = password
        self.app = app
        self.queue_lock = queue_lock
        self.add_api_route("/sdapi/v1/cmd-flags", self.get_cmd_flags, methods=["GET"])
        self.add_api_route("/sdapi/v1/progress", self.progressapi, methods=["GET"])
        self.add_api_route("/sdapi/v1/interrupt", self.interruptapi, methods=["POST"])

    def add_api_route(self, path: str, endpoint, **kwargs):
        if shared.cmd_opts.api_auth:
            return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
        expected = self.credentials.get(credentials.username)
        # like the WebUI: plain str compare_digest (which refuses non-ASCII str with TypeError)
        if expected is None or not compare_digest(credentials.password, expected):
            raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})
        return True

    def get_cmd_flags(self):
        return vars(shared.cmd_opts)

    def progressapi(self, skip_current_image: bool = False):
        """Progress of the current job from ``shared.state`` (ProgressResponse's fields, as a dict)."""
        st = shared.state
        if st.job_count == 0:
            return {"progress": 0, "eta_relative": 0, "state": st.dict(), "current_image": None,
                    "textinfo": st.textinfo, "current_task": None}
        progress = 0.01  # as the WebUI: never zero
        if st.job_count > 0:
            progress += st.job_no / st.job_count
        if st.sampling_steps > 0:
            progress += 1 / st.job_count * st.sampling_step / st.sampling_steps
        elapsed = time.time() - st.time_start
        eta_relative = elapsed / progress - elapsed
        return {"progress": min(progress, 1), "eta_relative": eta_relative, "state": st.dict(),
                "current_image": None, "textinfo": st.textinfo, "current_task": None}

    def interruptapi(self):
        shared.state.interrupt()
        return {}
