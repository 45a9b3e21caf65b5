"""What the CPU computes natively, for choosing dtypes.

On CPUs without AVX512-BF16 or AMX, oneDNN emulates bf16 matmuls: on a
2-core AMD EPYC with AVX2 only, a 1024x1024 bf16 matmul ran at 0.8 GFLOP/s
against 102 GFLOP/s in fp32, and a dev evaluation of Iris on the vLLM engine
took 44.5 s in bf16 against 15.8 s in fp32 (docs/benchmarks.md). The
engine and the trainer therefore use fp32 on such CPUs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX) that oneDNN uses."""
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust oneDNN
        return True
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def cpu_dtype() -> str:
    """The dtype an engine on this CPU should compute in: bfloat16 where native, else float32."""
    return "bfloat16" if cpu_has_native_bf16() else "float32"
