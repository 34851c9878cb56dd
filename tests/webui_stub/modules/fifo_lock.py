"""Stub of modules/fifo_lock.py (WebUI v1.10.1): a lock granted in request order."""
import threading


class FIFOLock(object):
    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()
