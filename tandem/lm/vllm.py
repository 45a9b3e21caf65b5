"""The default backend: vLLM in-process, with continuous batching.

``VLLM(model)`` renders and tokenizes prompts itself (``tandem.lm.chat``) and
sends token ids to an engine of the process's pool (``tandem.lm.vllm_pool``;
the engine and its feeding thread are ``tandem.lm.vllm_engine``). The engine
starts at the first request that reaches it, or at ``start()``: requests the
call cache answers never start one.

Adapters are served one of two ways (``adapter_mode``); a checkpoint tuned in
full (``tandem.lm.identity.is_full_checkpoint``) is always served as it is,
loaded into the engine like a merged copy:

- ``"lora"``: the base engine with ``enable_lora`` and a LoRARequest per call;
  no extra engine, best on GPUs;
- ``"merge"``: the adapter merged into a copy of the weights (cached under
  ``TANDEM_HOME/merged``, the newest ``TANDEM_MAX_MERGED`` kept:
  ``tandem.lm.merged_cache``), served by loading that copy into the engine;
  faster than LoRA requests on CPUs (docs/design.md), so it is the default
  there.

CPU settings (vLLM's CPU docs; docs/design.md's measurements): the OpenMP
threads are bound to every core and the KV cache is sized by
``kv_cache_gb``; both are only defaults, an environment that sets them wins.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from tandem.lm.hardware import cpu_dtype, cuda_available
from tandem.lm.identity import check_adapter_base, checkpoint_fingerprint, is_full_checkpoint
from tandem.lm.merged_cache import merged_checkpoint
from tandem.lm.models import resolve_model
from tandem.lm.protocol import LMError, Prompt, Request, TrainableLM, check_fits
from tandem.lm.vllm_engine import Engine, EngineClosed, EngineStartError  # noqa: F401 - part of this backend's API
from tandem.lm.vllm_pool import EngineGroup, abort, engine_stats, pool, shutdown_engines  # noqa: F401 - as above

__all__ = [
    "CPU_BLOCK_SIZE", "VLLM", "Engine", "EngineClosed", "EngineGroup", "EngineStartError", "abort", "cpu_env",
    "engine_stats", "pool", "shutdown_engines",
]

#: KV block size on CPUs (vLLM's CPU default is 128; see VLLM.__init__). The
#: OpenAI server that tandem.lm.vllm_server starts uses the same.
CPU_BLOCK_SIZE = 32


def cpu_env(kv_cache_gb: int) -> None:
    """Defaults for vLLM's CPU backend, set before the engine process starts."""
    n = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gb)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class VLLM(TrainableLM):
    """vLLM in-process. ``model``: an embedded model name or a checkpoint dir.

    ``start_timeout``: seconds the engine may take to start (default
    ``TANDEM_ENGINE_START_TIMEOUT``, else 1200). ``engines``: the
    ``EngineGroup`` that owns the engines this LM starts (``with_adapter``
    passes its creator's; by default a new one, owned by this LM).
    """

    def __init__(
        self,
        model: str | Path = "smollm2-135m",
        *,
        adapter: str | Path | None = None,
        adapter_mode: str | None = None,
        max_model_len: int = 4096,
        kv_cache_gb: int = 2,
        enforce_eager: bool = True,
        dtype: str | None = None,
        max_lora_rank: int = 64,
        start_timeout: float | None = None,
        engines: EngineGroup | None = None,
        **engine_options,
    ) -> None:
        if "cache" in engine_options:
            raise TypeError("VLLM takes no cache= option: get_lm(spec, cache=...) or "
                            "tandem.lm.caching.with_cache(lm, cache) puts any LM behind the call cache")
        if start_timeout is not None and not float(start_timeout) > 0:
            raise ValueError(f"start_timeout: expected a positive number of seconds, got {start_timeout!r}")
        self.model_dir = resolve_model(model)
        self.model = str(model)
        self.adapter = Path(adapter) if adapter else None
        self.full = self.adapter is not None and is_full_checkpoint(self.adapter)  # whole tuned weights, no LoRA
        self.name = f"vllm:{model}" + (f"+{self.adapter.name}" if self.adapter else "")
        # What with_adapter passes on to a copy, the adapter aside.
        self.settings = dict(model=model, adapter_mode=adapter_mode, max_model_len=max_model_len,
                             kv_cache_gb=kv_cache_gb, enforce_eager=enforce_eager, dtype=dtype,
                             max_lora_rank=max_lora_rank, start_timeout=start_timeout, **engine_options)
        gpu = cuda_available()
        self.adapter_mode = adapter_mode or ("lora" if gpu else "merge")
        if self.adapter_mode not in ("lora", "merge"):
            raise ValueError(f"adapter_mode must be 'lora' or 'merge', not {self.adapter_mode!r}")
        if not gpu:
            cpu_env(kv_cache_gb)
        # enforce_eager: graph compilation did not reload from its cache here and
        # cost more at every start than it saves on short jobs (docs/design.md).
        # None: bf16 on GPUs and on CPUs that compute it natively, else fp32
        # (emulated bf16 is several times slower; tandem/lm/hardware.py).
        dtype = dtype or ("bfloat16" if gpu else cpu_dtype())
        self.options = dict(max_model_len=max_model_len, enforce_eager=enforce_eager, dtype=dtype,
                            enable_prefix_caching=True, seed=0)
        if not gpu:
            # Prefix caching works in whole KV blocks; vLLM's CPU default of 128
            # tokens recomputes the tail of every shared demo prefix, 32 (the
            # smallest size its CPU kernels are tuned for) reuses most of it
            # (docs/design.md, "32-token KV blocks on CPU").
            self.options["block_size"] = CPU_BLOCK_SIZE
            # vllm-cpu kills the engine when a seeded request's prefill is split
            # into chunks (it rewinds the request's random generator, which CPU
            # generators cannot do). Without chunked prefill no prefill is split,
            # so seeded sampling works and samples repeat with the call cache off.
            self.options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
        self.options.update(engine_options)  # any vLLM engine argument, defaults above included
        if self.adapter_mode == "lora":
            self.options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=4)
        self.context_length = max_model_len
        self.start_timeout = start_timeout
        # Seeds reach the engine unless chunked prefill was switched back on for a
        # CPU (see above); then seeded requests are sampled unseeded and only the
        # call cache (keyed by the seed) makes them repeatable.
        self._seeds_supported = gpu or self.options.get("enable_chunked_prefill") is False
        self.engines = engines if engines is not None else EngineGroup()
        self._owns_engines = engines is None
        self.chat = self.engines.tokenizer(self.model_dir)
        self._lora_request = None
        self._fingerprint: str | None = None
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    # -- engine ------------------------------------------------------------------
    def serving_dir(self) -> Path:
        """The checkpoint the engine loads: the base, a fully tuned checkpoint, or (``merge``) base and adapter merged."""
        if self.full:
            check_adapter_base(self.adapter, self.model_dir)
            return self.adapter
        if self.adapter is None or self.adapter_mode == "lora":
            return self.model_dir
        # Merged copies live in the cache, not in the adapter folder: the
        # adapter stays a plain PEFT folder that saves and ships small.
        return merged_checkpoint(self.model_dir, self.adapter)

    def engine(self) -> Engine:
        """The running engine serving this LM's weights (started or reloaded if need be)."""
        if pool.aborted.is_set():
            raise LMError("tandem is shutting down (SIGTERM / Ctrl-C): no new vLLM calls")
        eng = self._engine
        if eng is None or eng.closed:
            # Many threads arrive here at once on the first call; one of them
            # merges the adapter (if any) and gets the engine.
            with self._engine_lock:
                eng = self._engine
                if eng is None or eng.closed:
                    eng = self._engine = pool.get(self.serving_dir(), self.options, self.engines,
                                                  self.start_timeout)
        return eng

    def _lora(self):
        if self.adapter is None or self.adapter_mode != "lora" or self.full:
            return None
        if self._lora_request is None:
            from vllm.lora.request import LoRARequest

            # Stable small integer id per adapter folder: vLLM caches by id.
            lora_id = int(checkpoint_fingerprint(self.adapter)[:7], 16) + 1
            self._lora_request = LoRARequest(self.adapter.name, lora_id, str(self.adapter))
        return self._lora_request

    def with_adapter(self, adapter: str | Path | None) -> "VLLM":
        """The same model and engine settings with ``adapter``; engines stay owned by this LM's group."""
        return VLLM(**{**self.settings, "adapter": adapter}, engines=self.engines)

    def spec(self) -> dict:
        return {"backend": "vllm", "model": self.model, "adapter": str(self.adapter) if self.adapter else None}

    # -- protocol ----------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            fp = f"vllm:{checkpoint_fingerprint(self.model_dir)}:{self.options['dtype']}"
            if self.adapter is not None:
                fp += f"+{checkpoint_fingerprint(self.adapter)}:{'full' if self.full else self.adapter_mode}"
            self._fingerprint = fp
        return self._fingerprint

    def render(self, prompt: Prompt) -> str:
        return self.chat.render(prompt)

    def tokenize(self, text: str) -> list[int]:
        return self.chat.encode(text)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def submit(self, request: Request) -> Future:
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> list[Future]:
        """Tokenize every request, then hand them to the engine at once; a request that cannot be sent
        (too long, say) fails alone through its future."""
        futs: list[Future] = [Future() for _ in requests]
        ready = []
        for request, fut in zip(requests, futs):
            try:
                from vllm import SamplingParams as VSP

                ids = self.tokenize(request.text)
                max_tokens = check_fits(self.name, self.context_length, request, len(ids))
                p = request.params
                params = VSP(temperature=p.temperature, max_tokens=max_tokens, stop=list(p.stop) or None,
                             seed=p.seed if self._seeds_supported else None, skip_special_tokens=True)
            except Exception as exc:  # noqa: BLE001 - submit never raises: the future carries it
                fut.set_exception(exc)
                continue
            ready.append((ids, params, fut))
        if ready:
            self.send(ready, retries=2)
        return futs

    def send(self, ready: list[tuple], retries: int) -> None:
        """Hand tokenized requests ``(ids, params, future)`` to the engine together; one that meets a
        closed engine is sent again."""
        try:
            inners = self.engine().submit_many([(ids, params, self._lora()) for ids, params, _ in ready])
        except BaseException as exc:  # noqa: BLE001 - e.g. shutting down; never leave the caller waiting
            for *_, fut in ready:
                fut.set_exception(exc)
            return
        for (ids, params, fut), inner in zip(ready, inners):
            self._forward(inner, ids, params, fut, retries)

    def _forward(self, inner: Future, ids: list[int], params, fut: Future, retries: int) -> None:
        """``inner``'s result or error to ``fut``; an EngineClosed sends the request again."""

        def done(f: Future) -> None:
            exc = f.exception()
            if isinstance(exc, EngineClosed) and retries > 0 and not pool.aborted.is_set():
                # The engine was closed or took other weights before this request
                # started: send it to the engine that serves our weights now (in a
                # thread of its own: this callback may run under the pool's lock).
                threading.Thread(target=self.send, args=([(ids, params, fut)], retries - 1), daemon=True).start()
                return
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(f.result())

        inner.add_done_callback(done)

    def start(self) -> None:
        """Start the engine (and merge the adapter) now."""
        self.engine()

    def close(self) -> None:
        """Close the engines this LM's group owns that no other LM uses; an adapter copy owns none."""
        self._engine = None
        if self._owns_engines:
            pool.release(self.engines)

    def __repr__(self) -> str:
        extra = f", adapter={str(self.adapter)!r}" if self.adapter else ""
        return f"VLLM({self.model!r}{extra})"
