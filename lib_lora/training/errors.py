"""What a training request or job can be refused with, and the HTTP status an API answers each with.

The host's own refusal (``TrainingRefused``) is declared with the host seam, in host.py.
"""
from __future__ import annotations

from .problems import DatasetError
from .options import OptionError


class JobError(Exception):
    """Base class; ``status`` is the HTTP status an API should answer with."""
    status = 400


class RequestError(JobError):
    """The request itself is wrong (unknown option, bad value, bad path or name).

    When one option is at fault, ``option`` is its field name and ``detail`` the reason, so each
    surface can name it its own way (the command line as its flag)."""
    status = 400

    def __init__(self, message: str, option: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.option = option
        self.detail = detail if detail is not None else message

    @classmethod
    def bad(cls, where: str, detail: str) -> "RequestError":
        """``where``: the request key ("network.rank"); the message reads ``where: detail``."""
        return cls(f"{where}: {detail}", where.rpartition(".")[2], detail)

    @classmethod
    def of(cls, e: OptionError) -> "RequestError":
        return cls(str(e), e.option, e.detail)


class JobConflict(JobError):
    """Cannot start now: a job is running, the output exists, or the host refuses its model."""
    status = 409


class JobNotFound(JobError, LookupError):
    status = 404


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``, for statuses (tracebacks go to the console)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (JobError, DatasetError)):
        return msg or type(e).__name__
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
