"""Start vLLM's OpenAI-compatible server as a child process, with tandem's engine settings.

    from tandem.lm.openai import OpenAILM
    from tandem.lm.vllm_server import VLLMServer

    with VLLMServer("smollm2-135m", log="server.log") as server:
        lm = OpenAILM("smollm2-135m", base_url=server.url, local_model="smollm2-135m")
        ...

The server (``python -m vllm.entrypoints.openai.api_server``) runs in its own
process group on 127.0.0.1, with the in-process ``VLLM`` engine's defaults:
eager, bf16, a 4,096-token context, prefix caching, no sampling defaults
from the checkpoint's generation_config.json, and on CPUs 32-token KV blocks
and a KV cache of ``kv_cache_gb``. Greedy replies of the two can therefore be
compared (tests/test_server_vllm.py does). ``stop()`` ends the whole group;
``kill()`` is a crash (SIGKILL), for tests of what a client does when its
server dies. The benchmarks and the real-server tests use this one class.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tandem.lm.hardware import cpu_dtype, cuda_available
from tandem.lm.models import resolve_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One vLLM OpenAI-compatible server. ``log``: a file, or a folder for one log per start."""

    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        *,
        log: str | Path,
        served_name: str | None = None,
        kv_cache_gb: int = 2,
        block_size: int | None = None,
        python: str | Path = sys.executable,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_dir = resolve_model(model)
        self.served_name = served_name or Path(str(model)).name
        self.log_target = Path(log)
        self.kv_cache_gb = kv_cache_gb
        from tandem.lm.vllm import CPU_BLOCK_SIZE

        self.gpu = cuda_available()
        # As the in-process engine: its block size on CPU, vLLM's default on GPUs.
        self.block_size = block_size if block_size is not None else (None if self.gpu else CPU_BLOCK_SIZE)
        self.python = str(python)
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"  # what OpenAILM's base_url takes
        self.root = f"http://127.0.0.1:{self.port}"  # /health, /metrics, the dev endpoints
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.start_s: float | None = None
        self.log: Path | None = None
        self.last_cmd: list[str] = []

    def cmd(self, *, lora: bool = False, prefix_caching: bool = True, max_lora_rank: int = 32) -> list[str]:
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
            "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
            "--enforce-eager", "--dtype", "bfloat16" if self.gpu else cpu_dtype(), "--max-model-len", "4096",
            "--seed", "0",
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
            "--generation-config", "vllm",
        ]
        if self.block_size:
            cmd += ["--block-size", str(self.block_size)]
        if lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank)]
        return cmd + list(self.extra_args)

    def start(self, *, lora: bool = False, prefix_caching: bool = True, max_lora_rank: int = 32,
              dev_mode: bool = False, timeout: float = 900) -> float:
        """Start it and wait until /health answers; returns the seconds that took.

        ``lora``: serve adapters loaded at run time (``/v1/load_lora_adapter``).
        ``dev_mode``: vLLM's development endpoints, e.g. ``POST /reset_prefix_cache``.
        """
        import httpx

        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"the vLLM server on port {self.port} is already running")
        env = dict(os.environ)
        if not self.gpu:
            n = os.cpu_count() or 1
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gb)
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        if lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        self.starts += 1
        self.log = (self.log_target / f"server-{self.starts}.log") if self.log_target.is_dir() else self.log_target
        self.last_cmd = self.cmd(lora=lora, prefix_caching=prefix_caching, max_lora_rank=max_lora_rank)
        t0 = time.monotonic()
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(self.last_cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"vLLM server exited with {code}; {self.log}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    self.start_s = time.monotonic() - t0
                    return self.start_s
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server not healthy after {timeout} s; {self.log}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the server's process group (API server, engine core, workers)."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)  # its own group only
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """A crash: SIGKILL to the whole group."""
        p, self.proc = self.proc, None
        if p is not None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)

    def __enter__(self) -> "VLLMServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
