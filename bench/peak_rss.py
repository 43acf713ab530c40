"""Peak resident memory of the current process, for benchmark subprocesses."""

from __future__ import annotations


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: on Linux a child's ru_maxrss starts from its parent's RSS at
    fork (it survives exec), so a benchmark child of a large parent reports the parent's memory.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
