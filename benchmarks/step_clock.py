"""Measuring a benchmark step (benchmarks/train.py): wall, thread-CPU and GPU kernel time, minor page faults,
and peak memory (RSS growth on CPU, the CUDA allocator's peak on a GPU); each variant in a process of its own."""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def cuda_mark(args) -> int:
    """Start a peak-memory window on CUDA; the bytes allocated now are its floor."""
    import torch
    if args["device"] != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def cuda_peak_mb(floor: int) -> float:
    import torch
    return (torch.cuda.max_memory_allocated() - floor) / 2**20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class KernelClock:
    """GPU busy time over some steps: the summed duration of every kernel, copy and fill the profiler saw."""

    def __init__(self, args):
        import torch
        self.on = args["device"] == "cuda" and args["kernel_steps"] > 0
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if self.on else None

    def start(self) -> None:
        if self.on:
            self.prof.__enter__()

    def stop(self, steps: int) -> float:
        """Seconds of GPU time per step (nan when not on CUDA)."""
        if not self.on:
            return float("nan")
        import torch
        torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        cuda = torch.autograd.DeviceType.CUDA
        busy_us = sum(e.time_range.elapsed_us() for e in self.prof.events() if e.device_type == cuda)
        return busy_us / 1e6 / steps


def timed_steps(step, args) -> dict:
    """Median wall and thread-CPU seconds and minor faults of ``step()`` (after the first), peak memory
    growth in MiB, and on CUDA the GPU's busy seconds per step over ``kernel_steps`` more."""
    import torch
    cuda = args["device"] == "cuda"
    base, floor = current_rss_mb(), cuda_mark(args)
    times, cpu, faults = [], [], []
    for _ in range(args["steps"]):
        t0, c0, f0 = time.perf_counter(), time.thread_time(), minor_faults()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        faults.append(minor_faults() - f0)
    peak = cuda_peak_mb(floor) if cuda else rss_mb() - base
    clock = KernelClock(args)
    clock.start()
    for _ in range(args["kernel_steps"] if clock.on else 0):
        step()
    return {"step_s": statistics.median(times[1:] or times), "cpu_s": statistics.median(cpu[1:] or cpu),
            "faults": statistics.median(faults[1:] or faults), "peak_mb": peak,
            "kernel_s": clock.stop(max(args["kernel_steps"], 1))}


def measure(fn, args, pinned: bool) -> dict:
    # glibc reads MALLOC_MMAP_THRESHOLD_ once, when the spawned interpreter starts
    env = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if pinned:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=fn, args=(args, q))
        p.start()
        out = q.get()
        p.join()
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        if env is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = env
    return out
