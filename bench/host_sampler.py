"""Where a host-paced step's main thread spends its time, without the profiler's ~2x stretch.

A daemon thread reads every other thread's Python stack (`sys._current_frames`) every `interval` seconds
and counts, per sample and thread (the main one, or "other": autograd's device thread runs backward and
our hooks on CUDA), the innermost frame (a C call shows as the Python line that made it) and the
innermost qft_ds frame (which line of ours it was under). Two runs' counts, one GPU against two, say
whether the extra host time sits in one call (a wait: the all-reduce's launch, a lock) or is spread over
every line (a slower or shared core). The main thread's CPU time against wall time says the same from
the other side: near 1 when it computes, below when it waits.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path


OURS = ("/qft_ds/", "/ops/")  # this package's frames (qft_ds and its kernels' ops)


def _where(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"


class HostSampler:
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.main = threading.main_thread().ident
        self.leaf: collections.Counter = collections.Counter()
        self.ours: collections.Counter = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host_sampler", daemon=True)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                # on CUDA, autograd runs backward (and our hooks) on its own device thread, while the
                # main thread waits in run_backward: both are counted, each under its own name
                who = "main" if ident == self.main else "other"
                self.leaf[f"{who} {_where(frame)}"] += 1
                f = frame
                while f is not None and not any(d in f.f_code.co_filename for d in OURS):
                    f = f.f_back
                self.ours[f"{who} {_where(f) if f is not None else '(outside qft_ds)'}"] += 1

    def start(self) -> "HostSampler":
        """Start sampling; call on the main thread (its CPU time is read here and in stop())."""
        self.wall0, self.cpu0 = time.perf_counter(), time.thread_time()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self.wall0
        self.main_cpu = time.thread_time() - self.cpu0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def summary(self, top: int = 25) -> dict:
        """Shares of the samples (of the wall time), the top innermost lines and the top qft_ds lines."""
        n = max(self.samples, 1)
        return {"samples": self.samples, "interval_s": self.interval, "wall_s": round(self.wall, 3),
                "main_thread_cpu_frac": round(self.main_cpu / self.wall, 3) if self.wall else None,
                "leaf": [(k, round(v / n, 4)) for k, v in self.leaf.most_common(top)],
                "qft_ds": [(k, round(v / n, 4)) for k, v in self.ours.most_common(top)]}
