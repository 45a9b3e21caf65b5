"""Any OpenAI-compatible server as a backend: vLLM, llama.cpp, SGLang, ...

    lm = OpenAILM("smollm2", base_url="http://127.0.0.1:8000/v1", local_model="smollm2-135m")
    lm = get_lm("openai:smollm2", base_url="http://127.0.0.1:8000/v1")

Two ways to send a prompt (``endpoint``):

- ``"completions"`` (the default when ``local_model`` is given): tandem
  renders the prompt itself, with the local checkpoint's chat template, and
  sends the text to ``/completions``. The server sees exactly what the
  in-process engine would see, assistant prefix included, so outputs match
  it token for token (given the same weights and dtype). Without a local
  model the text is the plain completion rendering (for base models).
- ``"chat"`` (the default without ``local_model``): the messages go to
  ``/chat/completions`` and the server applies its own template. The
  assistant prefix (``Reasoning:``) is sent as a partial assistant message
  that the model continues (``prefix_mode="continue"``: vLLM's
  ``continue_final_message``; ``"prefill"``: a trailing assistant message,
  which llama.cpp continues; ``"none"``: not sent, and a reply that starts
  with the prefix has it removed, so ``prefix + reply`` parses the same).

Requests go out at once, up to ``max_concurrency`` in flight, from a thread
pool sharing one ``httpx.Client``; the dispatcher's batching is bypassed, so a
slow request never holds back the next ones. 429, 5xx, timeouts, dropped
connections and unreadable replies are retried ``max_retries`` times with
exponential backoff and jitter (``Retry-After`` wins when the server sends
it); other 4xx fail at once. Errors are ``LMError`` subclasses naming the
URL, the model, the start of the prompt and the server's reply.

The call cache is keyed by ``fingerprint()``: the server URL, the model name
(the served LoRA name for adapters, which contains the adapter's content
hash) and the endpoint. A server's model *name* does not identify its
weights: if you restart a server on the same URL and name with different
weights, pass ``cache=False`` or serve them under another name
(``--served-model-name``), or cached replies of the old weights come back.

Weight steps: ``local_model`` (an embedded model name or a checkpoint dir,
the weights the server runs) is ``model_dir``, so tandem trains LoRA adapters
locally; ``with_adapter(dir)`` then serves the adapter from the server (vLLM
with ``--enable-lora``): it is loaded at run time through
``POST /v1/load_lora_adapter`` (server started with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) under a name made of the folder
name and its content hash. The server must be able to read the folder.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from tandem.lm.base import LM, Completion, ContextLengthError, LMError, Prompt, Request

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
_PREFIX_MODES = ("continue", "prefill", "none")
_MAX_RETRY_AFTER = 300.0


class ServerError(LMError):
    """The server did not produce a completion. ``status`` is the last HTTP status (None: no reply)."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class ServerUnavailable(ServerError):
    """Retries ran out: connection refused, timeouts, 429 or 5xx every time."""


class RequestRejected(ServerError):
    """The server refused the request (a 4xx other than 408/409/425/429); not retried."""


class AdapterNotServed(ServerError):
    """The server cannot serve the LoRA adapter (LoRA or runtime loading not enabled)."""


class _Retryable(Exception):
    def __init__(self, what: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.status = status
        self.retry_after = retry_after


def _excerpt(text: str, n: int = 80) -> str:
    text = text if len(text) <= n else text[:n] + "..."
    return repr(text)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _outcome(f: Future, name: str) -> Completion | BaseException:
    if f.cancelled():
        return LMError(f"{name} was closed with the request still waiting")
    return f.exception() or f.result()


class _Transport:
    """The HTTP client and the worker threads, shared by an LM and its adapter copies."""

    def __init__(self, max_concurrency: int, timeout: float, headers: dict[str, str]) -> None:
        import httpx

        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            headers=headers,
        )
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="tandem-openai")
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class _Shared:
    """State that ``with_adapter`` copies share with the LM they came from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transport: _Transport | None = None
        self.tokenizer: Any = None
        self.tok_lock = threading.Lock()
        # rendered text -> Prompt, so that a continuation request (text only)
        # can be sent to the chat endpoint as messages plus a partial reply.
        self.rendered: OrderedDict[str, Prompt] = OrderedDict()
        self.loaded_adapters: set[str] = set()
        self.adapter_locks: dict[str, threading.Lock] = {}


class OpenAILM(LM):
    """A model behind an OpenAI-compatible HTTP API. See the module docstring."""

    max_batch = 256
    _RENDERED_KEEP = 4096

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        endpoint: str | None = None,
        max_concurrency: int = 32,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        local_model: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        prefix_mode: str = "continue",
        context_length: int | None = None,
        extra_body: dict | None = None,
        cache: Any = True,
    ) -> None:
        if endpoint is None:
            endpoint = "completions" if local_model is not None else "chat"
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', not {endpoint!r}")
        if prefix_mode not in _PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {_PREFIX_MODES}, not {prefix_mode!r}")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.base_model = str(model)
        self.endpoint = endpoint
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.prefix_mode = prefix_mode
        self.extra_body = dict(extra_body or {})
        self.local_model = str(local_model) if local_model is not None else None
        self._model_dir: Path | None = None
        if local_model is not None:
            from tandem.lm.models import has_chat_template, resolve_model

            self._model_dir = resolve_model(local_model)
            self._chat = has_chat_template(self._model_dir)
        else:
            self._chat = False
        if context_length is not None:
            self.context_length = int(context_length)
        self._check_context = context_length is not None
        self._shared = _Shared()
        self._set_adapter(adapter)
        super().__init__(self._lm_name(), cache=cache)

    # -- identity ----------------------------------------------------------------
    def _set_adapter(self, adapter: str | os.PathLike | None) -> None:
        self.adapter: Path | None = None
        self.adapter_name: str | None = None
        if adapter is None:
            self.model = self.base_model
            return
        path = Path(adapter).expanduser()
        if path.is_dir():
            from tandem.lm.models import checkpoint_fingerprint

            self.adapter = path.resolve()
            self.adapter_name = f"{path.name}-{checkpoint_fingerprint(path)[:10]}"
        elif os.sep in str(adapter) or str(adapter).startswith("."):
            raise LMError(f"adapter folder {adapter} does not exist")
        else:
            # A LoRA the server already serves under this name (--lora-modules NAME=PATH).
            self.adapter_name = str(adapter)
        self.model = self.adapter_name

    def _lm_name(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    @property
    def model_dir(self) -> Path | None:
        """The local checkpoint (``local_model``): what the weight step trains on."""
        return self._model_dir

    def fingerprint(self) -> str:
        return f"openai:{self.base_url}:{self.model}:{self.endpoint}"

    def spec(self) -> dict:
        return {
            "backend": "openai",
            # a served-by-name LoRA has no folder to save: it is the model to ask for
            "model": self.model if self.adapter is None else self.base_model,
            "base_url": self.base_url,
            "adapter": str(self.adapter) if self.adapter is not None else None,
            "endpoint": self.endpoint,
            "local_model": self.local_model,
        }

    def with_adapter(self, adapter: str | os.PathLike | None) -> "OpenAILM":
        """The same server and settings, asking for the LoRA ``adapter`` (a folder or a served name)."""
        if adapter is not None and self._model_dir is not None and Path(adapter).is_dir():
            from tandem.train.adapter import META_FILE, check_adapter_base

            if (Path(adapter) / META_FILE).exists():
                check_adapter_base(adapter, self._model_dir)
        new = object.__new__(OpenAILM)
        new.__dict__.update(self.__dict__)
        new._set_adapter(adapter)
        # not `self.cache or False`: an empty CallCache is falsy
        LM.__init__(new, new._lm_name(), cache=self.cache if self.cache is not None else False)
        return new

    # -- local model: template and tokens ------------------------------------------
    def _tokenizer(self):
        if self._model_dir is None:
            return None
        sh = self._shared
        if sh.tokenizer is None:
            with sh.tok_lock:
                if sh.tokenizer is None:
                    from transformers import AutoTokenizer

                    sh.tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        return sh.tokenizer

    def chat_template(self, prompt: Prompt) -> str | None:
        if not self._chat:
            return None
        tok = self._tokenizer()
        msgs = [{"role": r, "content": c} for r, c in prompt.messages]
        with self._shared.tok_lock:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _starts_with_bos(self, text: str) -> bool:
        tok = self._tokenizer()
        bos = getattr(tok, "bos_token", None) if tok is not None else None
        return bool(bos and text.startswith(bos))

    def tokenize(self, text: str) -> list[int]:
        tok = self._tokenizer()
        if tok is None:
            raise LMError(f"{self.name}: counting tokens exactly needs local_model (the server's checkpoint)")
        special = not self._starts_with_bos(text)
        with self._shared.tok_lock:
            return list(tok.encode(text, add_special_tokens=special))

    def count_tokens(self, text: str) -> int:
        if self._model_dir is None:
            return super().count_tokens(text)
        return len(self.tokenize(text))

    def render(self, prompt: Prompt) -> str:
        text = super().render(prompt)
        if self.endpoint == "chat":
            sh = self._shared
            with sh.lock:
                sh.rendered[text] = prompt
                sh.rendered.move_to_end(text)
                while len(sh.rendered) > self._RENDERED_KEEP:
                    sh.rendered.popitem(last=False)
        return text

    # -- requests ----------------------------------------------------------------
    def _transport(self) -> _Transport:
        sh = self._shared
        t = sh.transport
        if t is None or t.closed:
            with sh.lock:
                t = sh.transport
                if t is None or t.closed:
                    headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                    t = sh.transport = _Transport(self.max_concurrency, self.timeout, headers)
        return t

    def _messages(self, req: Request) -> list[dict]:
        """Messages for the chat endpoint, the assistant prefix (or partial reply) last."""
        prompt, partial = req.prompt, None
        if prompt is not None:
            partial = prompt.prefix
        else:
            # A continuation (the predictor writes the next label and lets the
            # model go on): find the prompt whose rendering this text extends.
            with self._shared.lock:
                best = max((t for t in self._shared.rendered if req.text.startswith(t)), key=len, default=None)
                prompt = self._shared.rendered.get(best) if best is not None else None
            if prompt is None:
                raise LMError(
                    f"{self.name}: the chat endpoint needs the request's messages, and {_excerpt(req.text)} "
                    "is plain text; use endpoint='completions' (with local_model for chat models)"
                )
            partial = prompt.prefix + req.text[len(best):]
        msgs = [{"role": r, "content": c} for r, c in prompt.messages]
        if partial and (self.prefix_mode != "none" or req.prompt is None):
            msgs.append({"role": "assistant", "content": partial})
        return msgs

    def _payload(self, req: Request) -> tuple[str, dict]:
        p = req.params
        body: dict[str, Any] = {"model": self.model, "temperature": p.temperature}
        max_tokens = p.max_tokens
        if self._check_context and self._model_dir is not None:
            max_tokens = self.check_fits(req, self.count_tokens(req.text))
        body["max_tokens"] = max_tokens
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if self.endpoint == "completions":
            body["prompt"] = req.text
            if self._model_dir is not None and self._starts_with_bos(req.text):
                # The text already holds BOS (from the chat template): don't add
                # another, as the in-process engine doesn't (vLLM extension).
                body["add_special_tokens"] = False
            url = f"{self.base_url}/completions"
        else:
            msgs = self._messages(req)
            body["messages"] = msgs
            if msgs[-1]["role"] == "assistant" and self.prefix_mode == "continue":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            url = f"{self.base_url}/chat/completions"
        body.update(self.extra_body)
        return url, body

    def _describe(self, req: Request) -> str:
        return f"model {self.model!r}, prompt {_excerpt(req.text)}"

    def _call(self, req: Request) -> Completion:
        """One request, retried; raises an LMError subclass when it cannot be answered."""
        url, body = self._payload(req)
        if self.adapter is not None:
            self._ensure_adapter()
        attempts = 0
        last: _Retryable | None = None
        reloaded = False
        while True:
            attempts += 1
            try:
                return self._post_once(url, body, req)
            except _Retryable as exc:
                last = exc
            except RequestRejected as exc:
                if exc.status == 404 and self.adapter is not None and not reloaded:
                    # The server lost the adapter (restarted): load it again, once.
                    reloaded = True
                    self._shared.loaded_adapters.discard(self._adapter_key())
                    self._ensure_adapter()
                    attempts -= 1
                    continue
                if (exc.status == 400 and self.prefix_mode == "continue" and "continue_final_message" in body
                        and "continue_final_message" in str(exc)):
                    log.warning("%s does not take continue_final_message; sending the prefix as a prefill", url)
                    self.prefix_mode = "prefill"
                    url, body = self._payload(req)
                    attempts -= 1
                    continue
                raise
            if attempts > self.max_retries:
                break
            delay = min(self.max_backoff, self.backoff * 2 ** (attempts - 1)) * random.uniform(0.5, 1.0)
            if last.retry_after is not None:
                delay = min(_MAX_RETRY_AFTER, last.retry_after) + random.uniform(0, 0.1 * self.backoff)
            log.info("%s: %s; retry %d of %d in %.2f s", url, last.what, attempts, self.max_retries, delay)
            time.sleep(delay)
        assert last is not None
        hint = ""
        if last.status is None and "connect" in last.what:
            hint = "; is the server running and is base_url right? (docs/servers.md)"
        raise ServerUnavailable(
            f"{url}: {last.what} (after {attempts} attempts; {self._describe(req)}){hint}",
            url=url, status=last.status, attempts=attempts,
        )

    def _post_once(self, url: str, body: dict, req: Request) -> Completion:
        import httpx

        client = self._transport().client
        try:
            resp = client.post(url, json=body)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timed out after {self.timeout:g} s ({type(exc).__name__})") from None
        except httpx.ConnectError as exc:
            raise _Retryable(f"cannot connect ({exc})") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__}: {exc})") from None
        status = resp.status_code
        if status >= 400:
            text = resp.text[:300]
            if status in _RETRY_STATUS or status >= 500:
                raise _Retryable(f"HTTP {status}: {text!r}", status, _retry_after(resp.headers.get("retry-after")))
            msg = f"{url}: HTTP {status}: {text!r} ({self._describe(req)})"
            low = text.lower()
            if status == 400 and ("context length" in low or "context window" in low or "too long" in low):
                raise ContextLengthError(msg)
            raise RequestRejected(msg, url=url, status=status)
        try:
            data = resp.json()
            choice = data["choices"][0]
            if self.endpoint == "completions":
                text = choice["text"]
            else:
                text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _Retryable(
                f"HTTP {status} with an unreadable reply ({type(exc).__name__}: {exc}): {resp.text[:200]!r}", status
            ) from None
        if self.endpoint == "chat" and req.prompt is not None and self.prefix_mode == "none":
            prefix = req.prompt.prefix
            if prefix and text.lstrip().startswith(prefix):
                text = text.lstrip()[len(prefix):]
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        output_tokens = usage.get("completion_tokens")
        if not isinstance(prompt_tokens, int):
            prompt_tokens = self.count_tokens(req.text)
        if not isinstance(output_tokens, int):
            output_tokens = self.count_tokens(text) if text else 0
        return Completion(text, prompt_tokens, output_tokens, str(choice.get("finish_reason") or "stop"))

    # -- adapters on the server ----------------------------------------------------
    def _adapter_key(self) -> str:
        return f"{self.base_url}|{self.adapter_name}"

    def _ensure_adapter(self) -> None:
        """Load the LoRA folder into the server once (vLLM's runtime LoRA API)."""
        import httpx

        sh = self._shared
        key = self._adapter_key()
        if key in sh.loaded_adapters:
            return
        with sh.lock:
            lock = sh.adapter_locks.setdefault(key, threading.Lock())
        with lock:
            if key in sh.loaded_adapters:
                return
            url = f"{self.base_url}/load_lora_adapter"
            how = (
                f"start the server with LoRA serving and runtime loading: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                f"python -m vllm.entrypoints.openai.api_server --model {self.local_model or self.base_model} "
                f"--enable-lora --max-lora-rank 32 ..., or serve the adapter from the start with "
                f"--enable-lora --lora-modules {self.adapter_name}={self.adapter} (docs/servers.md)"
            )
            last = ""
            for attempt in range(self.max_retries + 1):
                try:
                    resp = self._transport().client.post(
                        url, json={"lora_name": self.adapter_name, "lora_path": str(self.adapter)}
                    )
                except httpx.TransportError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    time.sleep(min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0))
                    continue
                body = resp.text[:300]
                if resp.status_code < 300 or "already been loaded" in body:
                    sh.loaded_adapters.add(key)
                    log.info("server %s serves adapter %s as %r", self.base_url, self.adapter, self.adapter_name)
                    return
                if resp.status_code in (404, 405):
                    if self.adapter_name in self._served_models():
                        sh.loaded_adapters.add(key)
                        return
                    raise AdapterNotServed(
                        f"{url}: HTTP {resp.status_code}: the server has no runtime LoRA loading, and does not "
                        f"serve {self.adapter_name!r}; {how}", url=url, status=resp.status_code,
                    )
                if resp.status_code in _RETRY_STATUS and resp.status_code != 400:
                    last = f"HTTP {resp.status_code}: {body!r}"
                    time.sleep(min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0))
                    continue
                raise AdapterNotServed(
                    f"{url}: loading adapter {self.adapter} as {self.adapter_name!r} failed: HTTP "
                    f"{resp.status_code}: {body!r}; the server must run with --enable-lora and a "
                    f"--max-lora-rank at least the adapter's rank, and read the folder; {how}",
                    url=url, status=resp.status_code,
                )
            raise ServerUnavailable(f"{url}: cannot load adapter {self.adapter_name!r}: {last}", url=url)

    def _served_models(self) -> list[str]:
        try:
            resp = self._transport().client.get(f"{self.base_url}/models")
            return [m.get("id") for m in resp.json().get("data", [])]
        except Exception:  # noqa: BLE001 - only a hint
            return []

    # -- protocol ----------------------------------------------------------------
    def _enqueue(self, request: Request, fut: Future, key: str | None) -> None:
        try:
            inner = self._transport().pool.submit(self._call, request)
        except RuntimeError as exc:  # pool shut down by close() in between
            fut.set_exception(LMError(f"{self.name} is closed: {exc}"))
            return
        inner.add_done_callback(lambda f: self._finish(fut, key, _outcome(f, self.name)))

    def _generate(self, requests: list[Request]) -> list[Completion]:
        pool = self._transport().pool
        futs = [pool.submit(self._call, r) for r in requests]
        outs = [_outcome(f, self.name) for f in futs]
        for o in outs:
            if isinstance(o, BaseException):
                raise o
        return outs  # type: ignore[return-value]

    def start(self) -> None:
        """Check that the server answers (retrying while it starts), and load the adapter."""
        import httpx

        url = f"{self.base_url}/models"
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._transport().client.get(url)
                if resp.status_code < 400:
                    ids = [m.get("id") for m in (resp.json().get("data") or [])]
                    if ids and self.model not in ids and self.adapter is None:
                        log.warning("%s serves %s, not %r; requests may fail", url, ids, self.model)
                    break
                last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                if resp.status_code in (401, 403):
                    raise RequestRejected(f"{url}: {last}; set api_key or OPENAI_API_KEY", url=url,
                                          status=resp.status_code)
                if resp.status_code == 404:
                    break  # a server without /models can still complete
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            except ValueError:
                break
            if attempt < self.max_retries:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0))
        else:
            raise ServerUnavailable(
                f"{url}: the server does not answer ({last}); start it first (docs/servers.md)", url=url
            )
        if self.adapter is not None:
            self._ensure_adapter()

    def close(self) -> None:
        sh = self._shared
        with sh.lock:
            t, sh.transport = sh.transport, None
        if t is not None:
            t.close()

    def __repr__(self) -> str:
        return f"OpenAILM({self.model!r}, base_url={self.base_url!r}, endpoint={self.endpoint!r})"
