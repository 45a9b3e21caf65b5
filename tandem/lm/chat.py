"""A checkpoint's prompt text and tokens, the same for every backend.

Backend parity (the in-process vLLM engine, transformers, an OpenAI-compatible
server given the local checkpoint) rests on all of them rendering and
tokenizing a prompt alike, so this is the one place that does it:

- ``render``: the chat template with the generation prompt, then the reply's
  prefix, for models that have a template (instruct models); plain
  completion text for base models;
- ``encode``: the tokenizer adds its special tokens unless the text already
  starts with the BOS token (a chat template that writes BOS itself), so
  no prompt gets two.

The tokenizer loads on first use (transformers is imported then, not before),
and calls hold a lock: HF tokenizers are not safe to share across threads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tandem.lm.models import has_chat_template
from tandem.lm.protocol import Prompt


def render_completion_text(prompt: Prompt) -> str:
    """Plain-text rendering for base models without a chat template."""
    parts: list[str] = []
    for role, content in prompt.messages:
        if role == "system":
            parts.append(content.strip() + "\n\n")
        elif role == "user":
            parts.append("---\n\n" + content.strip() + "\n")
        else:
            parts.append(content.strip() + "\n\n")
    return "".join(parts) + prompt.prefix


class ChatTokenizer:
    """The tokenizer and chat template of the checkpoint in ``model_dir``."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.chat = has_chat_template(self.model_dir)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded on first use."""
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def chat_template(self, prompt: Prompt) -> str | None:
        """The messages under the chat template with the generation prompt; None without a template."""
        if not self.chat:
            return None
        tok = self.tokenizer
        msgs = [{"role": r, "content": c} for r, c in prompt.messages]
        with self._lock:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def render(self, prompt: Prompt) -> str:
        text = self.chat_template(prompt)
        return render_completion_text(prompt) if text is None else text + prompt.prefix

    def starts_with_bos(self, text: str) -> bool:
        bos = getattr(self.tokenizer, "bos_token", None)
        return bool(bos and text.startswith(bos))

    def encode(self, text: str) -> list[int]:
        """The token ids the model sees for ``text`` (special tokens added unless BOS is there)."""
        tok = self.tokenizer
        special = not self.starts_with_bos(text)
        with self._lock:
            return list(tok.encode(text, add_special_tokens=special))

    def decode(self, ids: list[int]) -> str:
        tok = self.tokenizer
        with self._lock:
            return tok.decode(ids, skip_special_tokens=True)
