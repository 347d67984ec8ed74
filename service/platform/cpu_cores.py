"""How many CPUs this process may really use: its affinity mask AND its cgroup's CPU quota.

A container limited to 16 CPUs on a 96-core node still sees 96 cores in its affinity mask; threads
sized from that are throttled by the CFS quota. cgroup v2 (`cpu.max`) and v1
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`) are both read, walking up the process's cgroup path, and
the tightest limit wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _affinity_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu controller path) of this process, from /proc/self/cgroup's text."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, path: str) -> list[Path]:
    """root/path, then each parent up to root (a limit anywhere above applies too)."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> float | None:
    """The CPU quota in CPUs (e.g. 16.0, 0.5), or None when there is none."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2, v1 = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    if v2 is not None:
        for folder in _ancestors(root, v2):
            text = _read(folder / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
    for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
        if not base.is_dir():
            continue
        for folder in _ancestors(base, v1 or "/"):
            cfs_quota, cfs_period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if cfs_quota and cfs_period and int(cfs_quota) > 0 and int(cfs_period) > 0:
                limits.append(int(cfs_quota) / int(cfs_period))
        break
    return min(limits) if limits else None


def usable_cpus(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> int:
    """CPUs this process may keep busy without being throttled (at least 1)."""
    count = _affinity_count()
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        count = min(count, max(1, math.floor(limit)))
    return count
