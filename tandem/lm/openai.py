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
the server's reply. The body and the reply: ``tandem.lm.openai_wire``.

A fleet: ``base_url`` may name several servers of the same model (a list, or
URLs separated by commas). Each request goes to the least busy one; a server
that stops answering is taken out, its requests go to the others, and it is
checked again after a cool-down (``tandem.lm.openai_fleet``). One URL is a
fleet of one.

The call cache (``get_lm``) is keyed by ``fingerprint()``: the server URL
(for a fleet, its sorted URLs: whichever server answered, the key is the
same), the model name (the served LoRA name for adapters, which contains the
adapter's content hash) and the endpoint. A server's model *name* does not
identify its weights: if you restart a server on the same URL and name with
different weights, pass ``cache=False`` or serve them under another name
(``--served-model-name``), or cached replies of the old weights come back.

Weight steps: ``local_model`` (an embedded model name or a checkpoint dir,
the weights the server runs) is ``model_dir``, so tandem trains LoRA adapters
locally; ``with_adapter(dir)`` then serves the adapter from the server, from
every server of a fleet (``tandem.lm.openai_lora``).
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
from tandem.lm.openai_chat import PREFIX_MODES, RenderedPrompts, excerpt
from tandem.lm.openai_fleet import Fleet, parse_base_urls
from tandem.lm.openai_http import (  # noqa: F401 - the errors are part of this backend's API
    AdapterNotServed, FleetMismatch, RequestRejected, RetryPolicy, ServerError, ServersDown, ServerUnavailable,
    Transport, list_models, transport_failure,
)
from tandem.lm.openai_lora import ServedAdapters, served_adapter
from tandem.lm.openai_wire import read_reply, request_body
from tandem.lm.protocol import Completion, LMError, Prompt, Request, TrainableLM

__all__ = [
    "DEFAULT_BASE_URL", "AdapterNotServed", "Connection", "FleetMismatch", "OpenAILM", "RequestRejected",
    "ServerError", "ServerUnavailable", "ServersDown",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class Connection:
    """What an ``OpenAILM`` shares with its adapter copies: the servers (a ``Fleet``), the HTTP
    transport (made on first use), the local tokenizer, the rendered prompts and the adapters each
    server has loaded."""

    def __init__(self, chat: ChatTokenizer | None, urls: list[str], policy: RetryPolicy, *, max_concurrency: int,
                 timeout: float, headers: dict[str, str], cooldown: float) -> None:
        self.chat = chat
        self.rendered = RenderedPrompts()
        self.adapters = ServedAdapters()
        self.timeout = timeout
        self._args = (max_concurrency, timeout, headers)
        self.fleet = Fleet(urls, policy, list_models=self.list_models, cooldown=cooldown)
        self._transport: Transport | None = None
        self._lock = threading.Lock()

    def transport(self) -> Transport:
        t = self._transport
        if t is None or t.closed:
            with self._lock:
                t = self._transport
                if t is None or t.closed:
                    t = self._transport = Transport(*self._args)
        return t

    def list_models(self, base_url: str) -> list[str] | None:
        """The models the server at ``base_url`` lists (``tandem.lm.openai_fleet.list_models``)."""
        return list_models(self.transport().client, base_url, min(self.timeout, 10.0))

    def close(self) -> None:
        with self._lock:
            t, self._transport = self._transport, None
        if t is not None:
            t.close()


class OpenAILM(TrainableLM):
    """A model behind an OpenAI-compatible HTTP API, on one server or a fleet. See the module docstring."""

    serves_full_weights = False  # the server loads LoRAs at run time, not whole checkpoints

    def __init__(
        self,
        model: str,
        *,
        base_url: str | list[str] = DEFAULT_BASE_URL,
        api_key: str | None = None,
        endpoint: str | None = None,
        max_concurrency: int = 32,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        cooldown: float = 5.0,
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
        if float(cooldown) <= 0:
            raise ValueError(f"cooldown must be above 0 seconds, not {cooldown!r}")
        self.base_urls = parse_base_urls(base_url)
        self.base_url = ",".join(self.base_urls)  # one URL, or a fleet's URLs separated by commas
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
                             backoff=backoff, max_backoff=max_backoff, cooldown=cooldown, local_model=local_model,
                             context_length=context_length, extra_body=extra_body)
        self._owns_connection = connection is None
        if connection is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            connection = Connection(ChatTokenizer(self.model_dir) if self.model_dir is not None else None,
                                    self.base_urls, self.retry, max_concurrency=max_concurrency,
                                    timeout=self.timeout, headers=headers, cooldown=float(cooldown))
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
        """The server (a fleet: its URLs, sorted), the model name and the endpoint; never which server answered."""
        return f"openai:{','.join(sorted(self.base_urls))}:{self.model}:{self.endpoint}"

    def spec(self) -> dict:
        return {
            "backend": "openai",
            # a served-by-name LoRA has no folder to save: it is the model to ask for
            "model": self.model if self.adapter is None else self.base_model,
            "base_url": self.base_urls[0] if len(self.base_urls) == 1 else list(self.base_urls),
            "adapter": str(self.adapter) if self.adapter is not None else None,
            "endpoint": self.endpoint,
            "local_model": self.local_model,
        }

    def with_adapter(self, adapter: str | os.PathLike | None) -> "OpenAILM":
        """The same servers, settings and connection, asking for the LoRA ``adapter`` (a folder or a served
        name); every server loads it before its first request."""
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
    def _describe(self, req: Request) -> str:
        return f"model {self.model!r}, prompt {excerpt(req.text)}"

    def call(self, req: Request) -> Completion:
        """One request, routed, retried and failed over; raises an LMError subclass when it cannot be answered."""
        fleet = self.connection.fleet
        if len(fleet.servers) > 1:
            fleet.ensure_checked(self.base_model)
        if self.adapter is not None:
            fleet.everywhere(self.model, self._load_adapter)
        while True:
            path, body = request_body(
                req, model=self.model, endpoint=self.endpoint, chat=self.connection.chat,
                rendered=self.connection.rendered, prefix_mode=self.prefix_mode, name=self.name,
                context_length=self.context_length, extra_body=self.extra_body)
            try:
                return fleet.send(lambda base: self._attempt(base, path, body, req), what=path,
                                  describe=self._describe(req), model=self.model)
            except RequestRejected as exc:
                if (exc.status == 400 and self.prefix_mode == "continue" and "continue_final_message" in body
                        and "continue_final_message" in str(exc)):
                    log.warning("%s does not take continue_final_message; sending the prefix as a prefill", exc.url)
                    self.prefix_mode = "prefill"
                    continue
                raise

    def _attempt(self, base_url: str, path: str, body: dict, req: Request) -> Completion:
        """One try on one server; a server that lost the adapter (restarted) loads it again, once."""
        self._load_adapter(base_url)
        try:
            return self._post_once(base_url + path, body, req)
        except RequestRejected as exc:
            if exc.status != 404 or self.adapter is None:
                raise
        self.connection.adapters.forget(base_url, self.adapter_name)
        self._load_adapter(base_url)
        return self._post_once(base_url + path, body, req)

    def _post_once(self, url: str, body: dict, req: Request) -> Completion:
        import httpx

        try:
            resp = self.connection.transport().client.post(url, json=body)
        except httpx.TransportError as exc:
            raise transport_failure(exc, self.timeout) from None
        return read_reply(resp, req, url=url, endpoint=self.endpoint, prefix_mode=self.prefix_mode,
                          describe=self._describe(req), count_tokens=self.count_tokens)

    def _load_adapter(self, base_url: str) -> None:
        if self.adapter is not None:
            self.connection.adapters.ensure(self.connection.transport, base_url, self.adapter_name, self.adapter,
                                            self.local_model or self.base_model)

    def served_models(self, base_url: str | None = None) -> list[str]:
        """The model names a server lists (the first of a fleet by default; empty when it cannot say)."""
        try:
            return self.connection.list_models(base_url or self.base_urls[0]) or []
        except Exception:  # noqa: BLE001 - only a hint
            return []

    def servers(self) -> list[dict]:
        """Per server of the fleet: ``url``, requests ``answered``, ``failures`` (tries), ``in_flight``,
        ``in_service`` and ``reason`` (why not)."""
        return self.connection.fleet.stats()

    # -- protocol ----------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        out: Future = Future()
        try:
            inner = self.connection.transport().pool.submit(self.call, request)
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
        """Check that every server answers and serves the model (retrying while they start;
        ``tandem.lm.openai_fleet``), and load the adapter on every server."""
        fleet = self.connection.fleet
        fleet.check(self.base_model, patient=True)
        if self.adapter is not None:
            fleet.everywhere(self.model, self._load_adapter)

    def close(self) -> None:
        """Close the HTTP client and its threads, which adapter copies share (a copy closes nothing);
        the next request opens new ones."""
        if self._owns_connection:
            self.connection.close()

    def __repr__(self) -> str:
        return f"OpenAILM({self.model!r}, base_url={self.base_url!r}, endpoint={self.endpoint!r})"
