"""CPU time and memory of a process, from Linux's /proc: what the benchmarks charge a server or
a worker for (its own CPU time is steadier than wall-clock rates on a shared machine)."""

from __future__ import annotations

import os
from pathlib import Path


def stat_cpu_seconds(stat: str) -> float:
    """User + system CPU time in a /proc ``stat`` line (of a process or one of its threads).

    The fields are counted after the command name's closing parenthesis: the name itself may
    hold spaces and parentheses."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used so far."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def rss_mb(pid: int) -> float:
    """The process's resident set size in MiB (0 when /proc does not say)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
