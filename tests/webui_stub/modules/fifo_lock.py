"""Stub of modules/fifo_lock.py (WebUI v1.10.1): a lock granted in request order.

Like the WebUI's, a thread that finds the lock taken queues an Event in ``_pending_threads``
(guarded by ``_inner_lock``); ``release`` sets the first queued Event and frees ``_lock``,
and the woken thread then takes ``_lock`` itself.
"""
import collections
import threading


class FIFOLock(object):
    def __init__(self):
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads = collections.deque()

    def acquire(self, blocking=True):
        with self._inner_lock:
            if self._lock.acquire(False):
                return True
            if not blocking:
                return False
            turn = threading.Event()
            self._pending_threads.append(turn)
        turn.wait()
        return self._lock.acquire()

    def release(self):
        with self._inner_lock:
            if self._pending_threads:
                self._pending_threads.popleft().set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, t, v, tb):
        self.release()
