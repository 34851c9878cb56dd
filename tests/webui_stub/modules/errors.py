"""Stub of modules/errors.py (WebUI v1.10.1)."""
import sys
import traceback


def report(message: str, *, exc_info: bool = False) -> None:
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(traceback.format_exc(), file=sys.stderr)


def display(e: Exception, task, *, full_traceback=False):
    print(f"{task or 'error'}: {type(e).__name__}: {e}", file=sys.stderr)


def display_once(e: Exception, task):
    display(e, task)
