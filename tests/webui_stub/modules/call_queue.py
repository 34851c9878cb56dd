"""Stub of modules/call_queue.py (WebUI v1.10.1): the lock every generation runs under."""
from modules import fifo_lock

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func):
    """As the WebUI wraps settings' onchange callbacks that touch the model: run under the queue lock."""
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f
