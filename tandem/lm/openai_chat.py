"""Chat messages for the ``/chat/completions`` endpoint, where the server applies its own template.

tandem's requests carry rendered text; the chat endpoint wants messages. A
request made from a ``Prompt`` keeps it, and its messages go out with the
assistant prefix (``Reasoning:``) as a partial assistant message that the
model continues (``prefix_mode``: ``"continue"``, vLLM's
``continue_final_message``; ``"prefill"``, a trailing assistant message,
which llama.cpp continues; ``"none"``, not sent, and a reply that starts with
the prefix has it removed, so ``prefix + reply`` parses the same). A
continuation (the predictor writes the next label and lets the model go on)
is text only: ``RenderedPrompts`` remembers which prompt each rendered text
came from, and the continuation becomes that prompt's messages plus the
partial reply.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from tandem.lm.protocol import LMError, Prompt, Request

PREFIX_MODES = ("continue", "prefill", "none")


def excerpt(text: str, n: int = 80) -> str:
    """The start of ``text``, quoted, for error messages."""
    return repr(text if len(text) <= n else text[:n] + "...")


class RenderedPrompts:
    """The most recent rendered texts and the prompts they came from (thread-safe, bounded)."""

    def __init__(self, keep: int = 4096) -> None:
        self.keep = keep
        self._prompts: OrderedDict[str, Prompt] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, text: str, prompt: Prompt) -> None:
        with self._lock:
            self._prompts[text] = prompt
            self._prompts.move_to_end(text)
            while len(self._prompts) > self.keep:
                self._prompts.popitem(last=False)

    def extended_by(self, text: str) -> tuple[str, Prompt] | None:
        """The longest remembered rendering that ``text`` starts with, and its prompt."""
        with self._lock:
            best = max((t for t in self._prompts if text.startswith(t)), key=len, default=None)
            return None if best is None else (best, self._prompts[best])


def chat_messages(req: Request, rendered: RenderedPrompts, prefix_mode: str, name: str) -> list[dict]:
    """Messages for the chat endpoint, the assistant prefix (or partial reply) last."""
    prompt, partial = req.prompt, None
    if prompt is not None:
        partial = prompt.prefix
    else:
        found = rendered.extended_by(req.text)
        if found is None:
            raise LMError(
                f"{name}: the chat endpoint needs the request's messages, and {excerpt(req.text)} "
                "is plain text; use endpoint='completions' (with local_model for chat models)"
            )
        base, prompt = found
        partial = prompt.prefix + req.text[len(base):]
    msgs = [{"role": r, "content": c} for r, c in prompt.messages]
    if partial and (prefix_mode != "none" or req.prompt is None):
        msgs.append({"role": "assistant", "content": partial})
    return msgs


def strip_repeated_prefix(text: str, req: Request, prefix_mode: str) -> str:
    """With ``prefix_mode="none"`` the model may write the prefix itself: drop it from the reply."""
    if req.prompt is not None and prefix_mode == "none":
        prefix = req.prompt.prefix
        if prefix and text.lstrip().startswith(prefix):
            return text.lstrip()[len(prefix):]
    return text
