"""Small helpers the benchmarks share: what machine and versions a figure was measured with,
and how a rate is printed."""

from __future__ import annotations

import platform
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "(not installed: source tree)"


def fmt_rate(per_s: float) -> str:
    return f"{per_s / 1e6:6.3f} M events/s"
