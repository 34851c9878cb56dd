"""Stub of modules/call_queue.py (WebUI v1.10.1): the lock every generation runs under."""
from modules import fifo_lock

queue_lock = fifo_lock.FIFOLock()
