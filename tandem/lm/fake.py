"""A scripted LM for orchestration tests: no weights, fully predictable.

``FakeLM(fn)`` answers each rendered prompt with ``fn(text)``; the prompt
text contains the fields, so a test can answer "correctly" for some inputs
and wrongly for others. ``FakeLM.with_adapter`` returns a LM whose
fingerprint and replies change, which is enough to test weight steps.
"""

from __future__ import annotations

import threading
from typing import Callable

from tandem.lm.base import BatchedLM
from tandem.lm.protocol import Completion, Prompt, Request, TrainableLM


class FakeLM(BatchedLM, TrainableLM):
    max_batch = 64

    def __init__(
        self,
        reply: Callable[[str], str] | str,
        name: str = "fake",
        chat: bool = True,
        adapter: str | None = None,
    ) -> None:
        super().__init__(name)
        self._reply = reply if callable(reply) else (lambda _t, *, r=reply: r)
        self.chat = chat
        self.adapter = adapter
        self._base_reply = self._reply
        # Tests script how "trained" weights answer: adapter path -> reply function.
        self.adapter_replies: dict[str, Callable[[str], str]] = {}
        self.model_dir = None  # tests point this at a folder to allow weight steps
        self.prompts: list[str] = []
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def spec(self) -> dict:
        return {"backend": "fake", "model": self.name, "adapter": self.adapter}

    def fingerprint(self) -> str:
        return f"fake:{self.name}:{self.adapter}"

    def render(self, prompt: Prompt) -> str:
        if not self.chat:
            return super().render(prompt)
        return "".join(f"<|{role}|>{content}<|end|>" for role, content in prompt.messages) + "<|assistant|>" + prompt.prefix

    def generate_batch(self, requests: list[Request]) -> list[Completion]:
        with self._lock:
            self.batches.append(len(requests))
            self.prompts.extend(r.text for r in requests)
        out = []
        for r in requests:
            text = self._reply(r.text, r.params) if self._wants_params() else self._reply(r.text)
            out.append(Completion(text, self.count_tokens(r.text), self.count_tokens(text)))
        return out

    def _wants_params(self) -> bool:
        """Reply functions may take (text) or (text, sampling params)."""
        import inspect

        try:
            params = inspect.signature(self._reply).parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            return len(positional) >= 2
        except (TypeError, ValueError):
            return False

    def with_adapter(self, adapter, reply: Callable[[str], str] | None = None) -> "FakeLM":
        new = FakeLM(reply or self.adapter_replies.get(str(adapter), self._reply) if adapter else self._base_reply,
                     name=self.name, chat=self.chat, adapter=str(adapter) if adapter else None)
        new._base_reply = self._base_reply
        new.adapter_replies = self.adapter_replies
        new.model_dir = self.model_dir
        return new
