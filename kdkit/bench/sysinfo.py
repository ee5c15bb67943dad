"""CPU time of this process and its children, and a description of the machine, for benchmark tables.

DataLoader workers are live child processes while they are measured, which `getrusage(CHILDREN)`
does not see (it counts only children that have exited and been waited for); their time is read
from /proc instead, so the baseline's CPU use is not under-reported.
"""
from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass


def _proc_children_cpu(root: int) -> float:
    """utime + stime (s) of the live descendants of `root`, from /proc (0 where /proc is absent)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        rest = f.read().rsplit(")", 1)[1].split()
                    stats[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / ticks)
                except (OSError, IndexError, ValueError):
                    continue  # the process ended while we looked
    except (OSError, ValueError, AttributeError):
        return 0.0
    total, frontier = 0.0, {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier}
        total += sum(stats[pid][1] for pid in frontier)
    return total


def cpu_seconds() -> float:
    """CPU seconds used so far by this process, its exited children and its live descendants."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    dead = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + dead.ru_utime + dead.ru_stime + _proc_children_cpu(os.getpid())


@dataclass
class Stopwatch:
    """Wall and CPU time between start() and stop(); cpu_percent = 100 per fully busy core."""

    wall: float = 0.0
    cpu: float = 0.0

    def start(self) -> "Stopwatch":
        self._wall0, self._cpu0 = time.perf_counter(), cpu_seconds()
        return self

    def stop(self) -> "Stopwatch":
        self.wall = time.perf_counter() - self._wall0
        self.cpu = cpu_seconds() - self._cpu0
        return self

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu / self.wall if self.wall > 0 else 0.0


def machine() -> dict:
    import torch

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:  # pragma: no cover - DALI is a dependency
        dali_version = None
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "cpu_cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def save_report(path, report: dict) -> None:
    """A benchmark script's report as JSON (`--json PATH`), its folder made first."""
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
