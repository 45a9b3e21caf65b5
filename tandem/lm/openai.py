"""Any OpenAI-compatible server as a backend: vLLM, llama.cpp, SGLang, ...

    lm = OpenAILM("smollm2", base_url="http://127.0.0.1:8000/v1", local_model="smollm2-135m")
    lm = get_lm("openai:smollm2", base_url="http://127.0.0.1:8000/v1")

Two ways to send a prompt (``endpoint``):

- ``"completions"`` (the default when ``local_model`` is given): tandem
  renders the prompt itself, with the local checkpoint's chat template
  (``tandem.lm.chat``, as the in-process engine does), and sends the text to
  ``/completions``. The server sees exactly what the in-process engine would
  see, assistant prefix included, so outputs match it token for token (given
  the same weights and dtype). Without a local model the text is the plain
  completion rendering (for base models).
- ``"chat"`` (the default without ``local_model``): the messages go to
  ``/chat/completions`` and the server applies its own template
  (``tandem.lm.openai_chat``: the assistant prefix and ``prefix_mode``).

Requests go out at once, up to ``max_concurrency`` in flight, from a thread
pool sharing one ``httpx.Client``. Failures are retried by one policy
(``tandem.lm.openai_http``: tenacity, ``Retry-After`` honoured); errors are
``LMError`` subclasses naming the URL, the model, the start of the prompt and
the server's reply.

The call cache (``get_lm``) is keyed by ``fingerprint()``: the server URL,
the model name (the served LoRA name for adapters, which contains the
adapter's content hash) and the endpoint. A server's model *name* does not
identify its weights: if you restart a server on the same URL and name with
different weights, pass ``cache=False`` or serve them under another name
(``--served-model-name``), or cached replies of the old weights come back.

Weight steps: ``local_model`` (an embedded model name or a checkpoint dir,
the weights the server runs) is ``model_dir``, so tandem trains LoRA adapters
locally; ``with_adapter(dir)`` then serves the adapter from the server
(``tandem.lm.openai_lora``).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import tenacity

from tandem.lm.chat import ChatTokenizer, render_completion_text
from tandem.lm.identity import check_if_tandem_adapter
from tandem.lm.openai_chat import PREFIX_MODES, RenderedPrompts, chat_messages, excerpt, strip_repeated_prefix
from tandem.lm.openai_http import (  # noqa: F401 - the errors are part of this backend's API
    RETRY_STATUS, AdapterNotServed, RequestRejected, RetryPolicy, Retryable, ServerError, ServerUnavailable,
    Transport, last_failure, parse_retry_after, retrying, transport_failure,
)
from tandem.lm.openai_lora import ServedAdapters, served_adapter, served_models
from tandem.lm.protocol import Completion, ContextLengthError, LMError, Prompt, Request, TrainableLM, check_fits

__all__ = [
    "DEFAULT_BASE_URL", "AdapterNotServed", "Connection", "OpenAILM", "RequestRejected", "ServerError",
    "ServerUnavailable",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class Connection:
    """What an ``OpenAILM`` shares with its adapter copies: the HTTP transport (made on first use),
    the local tokenizer, the rendered prompts and the adapters the server has loaded."""

    def __init__(self, chat: ChatTokenizer | None) -> None:
        self.chat = chat
        self.rendered = RenderedPrompts()
        self.adapters = ServedAdapters()
        self._transport: Transport | None = None
        self._lock = threading.Lock()

    def transport(self, max_concurrency: int, timeout: float, headers: dict[str, str]) -> Transport:
        t = self._transport
        if t is None or t.closed:
            with self._lock:
                t = self._transport
                if t is None or t.closed:
                    t = self._transport = Transport(max_concurrency, timeout, headers)
        return t

    def close(self) -> None:
        with self._lock:
            t, self._transport = self._transport, None
        if t is not None:
            t.close()


class OpenAILM(TrainableLM):
    """A model behind an OpenAI-compatible HTTP API. See the module docstring."""

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
        connection: Connection | None = None,
    ) -> None:
        if endpoint is None:
            endpoint = "completions" if local_model is not None else "chat"
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', not {endpoint!r}")
        if prefix_mode not in PREFIX_MODES:
            raise ValueError(f"prefix_mode must be one of {PREFIX_MODES}, not {prefix_mode!r}")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.base_model = str(model)
        self.endpoint = endpoint
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.retry = RetryPolicy(int(max_retries), float(backoff), float(max_backoff))
        self.prefix_mode = prefix_mode
        self.extra_body = dict(extra_body or {})
        self.local_model = str(local_model) if local_model is not None else None
        self.model_dir: Path | None = None
        if local_model is not None:
            from tandem.lm.models import resolve_model

            self.model_dir = resolve_model(local_model)
        self.context_length = int(context_length) if context_length is not None else None
        # What with_adapter passes on to a copy, the adapter aside.
        self.settings = dict(model=model, base_url=base_url, api_key=api_key, endpoint=endpoint,
                             max_concurrency=max_concurrency, timeout=timeout, max_retries=max_retries,
                             backoff=backoff, max_backoff=max_backoff, local_model=local_model,
                             context_length=context_length, extra_body=extra_body)
        self._owns_connection = connection is None
        if connection is None:
            connection = Connection(ChatTokenizer(self.model_dir) if self.model_dir is not None else None)
        self.connection = connection
        self.adapter: Path | None = None
        self.adapter_name: str | None = None
        if adapter is None:
            self.model = self.base_model
        else:
            self.adapter, self.adapter_name = served_adapter(adapter)
            self.model = self.adapter_name
        self.name = f"openai:{self.model}@{self.base_url}"

    # -- identity ----------------------------------------------------------------
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
        """The same server, settings and connection, asking for the LoRA ``adapter`` (a folder or a served name)."""
        if adapter is not None and self.model_dir is not None and Path(adapter).is_dir():
            check_if_tandem_adapter(adapter, self.model_dir)
        return OpenAILM(**{**self.settings, "prefix_mode": self.prefix_mode, "adapter": adapter},
                        connection=self.connection)

    # -- local model: template and tokens ------------------------------------------
    def render(self, prompt: Prompt) -> str:
        chat = self.connection.chat
        text = chat.render(prompt) if chat is not None else render_completion_text(prompt)
        if self.endpoint == "chat":
            self.connection.rendered.remember(text, prompt)
        return text

    def tokenize(self, text: str) -> list[int]:
        chat = self.connection.chat
        if chat is None:
            raise LMError(f"{self.name}: counting tokens exactly needs local_model (the server's checkpoint)")
        return chat.encode(text)

    def count_tokens(self, text: str) -> int:
        if self.connection.chat is None:
            return max(1, len(text) // 4)
        return len(self.tokenize(text))

    # -- requests ----------------------------------------------------------------
    def _transport(self) -> Transport:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return self.connection.transport(self.max_concurrency, self.timeout, headers)

    def _payload(self, req: Request) -> tuple[str, dict]:
        p = req.params
        body: dict[str, Any] = {"model": self.model, "temperature": p.temperature}
        max_tokens = p.max_tokens
        if self.context_length is not None and self.connection.chat is not None:
            max_tokens = check_fits(self.name, self.context_length, req, self.count_tokens(req.text))
        body["max_tokens"] = max_tokens
        if p.stop:
            body["stop"] = list(p.stop)
        if p.seed is not None:
            body["seed"] = p.seed
        if self.endpoint == "completions":
            body["prompt"] = req.text
            if self.connection.chat is not None and self.connection.chat.starts_with_bos(req.text):
                # The text already holds BOS (from the chat template): don't add
                # another, as the in-process engine doesn't (vLLM extension).
                body["add_special_tokens"] = False
            url = f"{self.base_url}/completions"
        else:
            msgs = chat_messages(req, self.connection.rendered, self.prefix_mode, self.name)
            body["messages"] = msgs
            if msgs[-1]["role"] == "assistant" and self.prefix_mode == "continue":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            url = f"{self.base_url}/chat/completions"
        body.update(self.extra_body)
        return url, body

    def _describe(self, req: Request) -> str:
        return f"model {self.model!r}, prompt {excerpt(req.text)}"

    def call(self, req: Request) -> Completion:
        """One request, retried; raises an LMError subclass when it cannot be answered."""
        url, body = self._payload(req)
        self._ensure_adapter()
        reloaded = False
        while True:
            try:
                return self._post(url, body, req)
            except RequestRejected as exc:
                if exc.status == 404 and self.adapter is not None and not reloaded:
                    # The server lost the adapter (restarted): load it again, once.
                    reloaded = True
                    self.connection.adapters.forget(self.base_url, self.adapter_name)
                    self._ensure_adapter()
                    continue
                if (exc.status == 400 and self.prefix_mode == "continue" and "continue_final_message" in body
                        and "continue_final_message" in str(exc)):
                    log.warning("%s does not take continue_final_message; sending the prefix as a prefill", url)
                    self.prefix_mode = "prefill"
                    url, body = self._payload(req)
                    continue
                raise

    def _post(self, url: str, body: dict, req: Request) -> Completion:
        try:
            return retrying(self.retry, url)(self._post_once, url, body, req)
        except tenacity.RetryError as err:
            last, attempts = last_failure(err)
        hint = ""
        if last.status is None and "connect" in last.what:
            hint = "; is the server running and is base_url right? (docs/servers.md)"
        raise ServerUnavailable(
            f"{url}: {last.what} (after {attempts} attempts; {self._describe(req)}){hint}",
            url=url, status=last.status, attempts=attempts,
        )

    def _post_once(self, url: str, body: dict, req: Request) -> Completion:
        import httpx

        try:
            resp = self._transport().client.post(url, json=body)
        except httpx.TransportError as exc:
            raise transport_failure(exc, self.timeout) from None
        status = resp.status_code
        if status >= 400:
            text = resp.text[:300]
            if status in RETRY_STATUS or status >= 500:
                raise Retryable(f"HTTP {status}: {text!r}", status, parse_retry_after(resp.headers.get("retry-after")))
            msg = f"{url}: HTTP {status}: {text!r} ({self._describe(req)})"
            low = text.lower()
            if status == 400 and ("context length" in low or "context window" in low or "too long" in low):
                raise ContextLengthError(msg)
            raise RequestRejected(msg, url=url, status=status)
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["text"] if self.endpoint == "completions" else (choice["message"].get("content") or "")
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise Retryable(
                f"HTTP {status} with an unreadable reply ({type(exc).__name__}: {exc}): {resp.text[:200]!r}", status
            ) from None
        if self.endpoint == "chat":
            text = strip_repeated_prefix(text, req, self.prefix_mode)
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        output_tokens = usage.get("completion_tokens")
        if not isinstance(prompt_tokens, int):
            prompt_tokens = self.count_tokens(req.text)
        if not isinstance(output_tokens, int):
            output_tokens = self.count_tokens(text) if text else 0
        return Completion(text, prompt_tokens, output_tokens, str(choice.get("finish_reason") or "stop"))

    def served_models(self) -> list[str]:
        """The model names the server lists (empty when it cannot say)."""
        return served_models(self._transport(), self.base_url)

    def _ensure_adapter(self) -> None:
        if self.adapter is not None:
            self.connection.adapters.ensure(self._transport, self.retry, self.base_url, self.adapter_name,
                                            self.adapter, self.local_model or self.base_model)

    # -- protocol ----------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        out: Future = Future()
        try:
            inner = self._transport().pool.submit(self.call, request)
        except RuntimeError as exc:  # pool shut down by close() in between
            out.set_exception(LMError(f"{self.name} is closed: {exc}"))
            return out

        def done(f: Future) -> None:
            if f.cancelled():
                out.set_exception(LMError(f"{self.name} was closed with the request still waiting"))
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result())

        inner.add_done_callback(done)
        return out

    def start(self) -> None:
        """Check that the server answers (retrying while it starts), and load the adapter."""
        import httpx

        url = f"{self.base_url}/models"

        def check() -> None:
            try:
                resp = self._transport().client.get(url)
            except httpx.TransportError as exc:
                raise Retryable(f"{type(exc).__name__}: {exc}") from None
            if resp.status_code == 404:
                return  # a server without /models can still complete
            if resp.status_code in (401, 403):
                raise RequestRejected(f"{url}: HTTP {resp.status_code}: {resp.text[:200]!r}; set api_key or "
                                      "OPENAI_API_KEY", url=url, status=resp.status_code)
            if resp.status_code >= 400:
                raise Retryable(f"HTTP {resp.status_code}: {resp.text[:200]!r}", resp.status_code)
            try:
                ids = [m.get("id") for m in (resp.json().get("data") or [])]
            except ValueError:
                return
            if ids and self.model not in ids and self.adapter is None:
                log.warning("%s serves %s, not %r; requests may fail", url, ids, self.model)

        try:
            retrying(self.retry, url)(check)
        except tenacity.RetryError as err:
            last, _ = last_failure(err)
            raise ServerUnavailable(
                f"{url}: the server does not answer ({last.what}); start it first (docs/servers.md)", url=url
            ) from None
        self._ensure_adapter()

    def close(self) -> None:
        """Close the HTTP client and its threads, which adapter copies share (a copy closes nothing);
        the next request opens new ones."""
        if self._owns_connection:
            self.connection.close()

    def __repr__(self) -> str:
        return f"OpenAILM({self.model!r}, base_url={self.base_url!r}, endpoint={self.endpoint!r})"
