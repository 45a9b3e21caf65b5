"""What the machine computes natively, for choosing dtypes and engine settings.

On CPUs without AVX512-BF16 or AMX, oneDNN emulates bf16 matmuls, which is
several times slower than fp32 (docs/design.md, "The engine computes in
fp32 on CPUs without native bf16"); the engine and the trainer then use fp32.
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


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (False without torch)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no GPU path
        return False
