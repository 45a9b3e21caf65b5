"""What the ``openai`` backend sends and how it reads the reply: one request's JSON body, one reply's
completion.

``request_body`` builds the body for ``/completions`` (tandem's rendered text;
``add_special_tokens`` off when the text already holds BOS) or for
``/chat/completions`` (messages, the assistant prefix last,
``tandem.lm.openai_chat``). ``read_reply`` turns an HTTP reply into a
``Completion``, or raises: ``Retryable`` for a reply worth another try (429,
5xx, unreadable JSON), ``ContextLengthError`` for a prompt that does not fit,
``RequestRejected`` for any other 4xx.
"""

from __future__ import annotations

from typing import Any, Callable

from tandem.lm.chat import ChatTokenizer
from tandem.lm.openai_chat import RenderedPrompts, chat_messages, strip_repeated_prefix
from tandem.lm.openai_http import RETRY_STATUS, RequestRejected, Retryable, parse_retry_after
from tandem.lm.protocol import Completion, ContextLengthError, Request, check_fits


def request_body(req: Request, *, model: str, endpoint: str, chat: ChatTokenizer | None, rendered: RenderedPrompts,
                 prefix_mode: str, name: str, context_length: int | None, extra_body: dict) -> tuple[str, dict]:
    """(path under the API root, JSON body) for ``req``."""
    p = req.params
    body: dict[str, Any] = {"model": model, "temperature": p.temperature}
    max_tokens = p.max_tokens
    if context_length is not None and chat is not None:
        max_tokens = check_fits(name, context_length, req, len(chat.encode(req.text)))
    body["max_tokens"] = max_tokens
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    if endpoint == "completions":
        body["prompt"] = req.text
        if chat is not None and chat.starts_with_bos(req.text):
            # The text already holds BOS (from the chat template): don't add
            # another, as the in-process engine doesn't (vLLM extension).
            body["add_special_tokens"] = False
        path = "/completions"
    else:
        msgs = chat_messages(req, rendered, prefix_mode, name)
        body["messages"] = msgs
        if msgs[-1]["role"] == "assistant" and prefix_mode == "continue":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        path = "/chat/completions"
    body.update(extra_body)
    return path, body


def read_reply(resp, req: Request, *, url: str, endpoint: str, prefix_mode: str, describe: str,
               count_tokens: Callable[[str], int]) -> Completion:
    """The completion in ``resp`` (an httpx response to ``url``), or the error it means (module docstring)."""
    status = resp.status_code
    if status >= 400:
        text = resp.text[:300]
        if status in RETRY_STATUS or status >= 500:
            raise Retryable(f"HTTP {status}: {text!r}", status, parse_retry_after(resp.headers.get("retry-after")))
        msg = f"{url}: HTTP {status}: {text!r} ({describe})"
        low = text.lower()
        if status == 400 and ("context length" in low or "context window" in low or "too long" in low):
            raise ContextLengthError(msg)
        raise RequestRejected(msg, url=url, status=status)
    try:
        data = resp.json()
        choice = data["choices"][0]
        text = choice["text"] if endpoint == "completions" else (choice["message"].get("content") or "")
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise Retryable(
            f"HTTP {status} with an unreadable reply ({type(exc).__name__}: {exc}): {resp.text[:200]!r}", status
        ) from None
    if endpoint == "chat":
        text = strip_repeated_prefix(text, req, prefix_mode)
    usage = data.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens")
    output_tokens = usage.get("completion_tokens")
    if not isinstance(prompt_tokens, int):
        prompt_tokens = count_tokens(req.text)
    if not isinstance(output_tokens, int):
        output_tokens = count_tokens(text) if text else 0
    return Completion(text, prompt_tokens, output_tokens, str(choice.get("finish_reason") or "stop"))
