"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform says."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(out: Path, doc: dict) -> None:
    """Write a benchmark's JSON to ``out`` with the date and the machine it ran on, and say so."""
    doc = {**doc, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpu": cpu_model(), "cores": os.cpu_count()}}
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nwritten {out}")
