"""Predictors: one LM call each.

``Predict(signature)`` renders the signature, its demos and the inputs into a
prompt, calls its LM (or the default one in ``tandem.settings``), parses the
reply into output fields and records the call in the active trace.
``ChainOfThought`` adds a ``reasoning`` field before the outputs.
"""

from __future__ import annotations

import contextvars
import copy
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator

from tandem.lm.base import LM, Request, SamplingParams
from tandem.program.example import Prediction
from tandem.program.module import Module, predictor_name
from tandem.program.formats import PromptFormat, get_format
from tandem.program.render import ParseError
from tandem.program.signature import Field, Signature
from tandem.program.trace import current_trace
from tandem.settings import settings

__all__ = ["Predict", "ChainOfThought", "ParseError", "sampling_override", "hint_override"]

_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tandem_sampling", default=None)
_hint: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tandem_hint", default=None)


@contextmanager
def sampling_override(**params: Any) -> Iterator[None]:
    """Run predictors with other sampling settings, e.g. ``temperature=0.7, seed=3``.

    Bootstrapping uses it to re-sample examples that failed greedily; it is
    context-local, so concurrent runs in other threads are unaffected.
    """
    token = _override.set(params)
    try:
        yield
    finally:
        _override.reset(token)


@contextmanager
def hint_override(hint: dict | None) -> Iterator[None]:
    """Show every predictor the gold labels ``hint`` (``{"species": "setosa"}``).

    A predictor that writes a hinted field sees the answer in its reply
    format; the others see it named below their inputs (``build_prompt``).

    The weight step's rationalization (STaR) runs an example that no sample
    passed with its gold answer as a hint; the trace records the inputs
    without it, so the SFT prompt built from the trace never shows the hint.
    Context-local like ``sampling_override``.
    """
    token = _hint.set(hint)
    try:
        yield
    finally:
        _hint.reset(token)


class Predict(Module):
    is_predictor = True

    def __init__(
        self,
        signature: Signature | str | type,
        *,
        instructions: str | None = None,
        lm: LM | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        fill_missing: bool = True,
        format: str | PromptFormat | None = None,
    ) -> None:
        sig = Signature.ensure(signature)
        if instructions is not None:
            sig = sig.with_instructions(instructions)
        self.signature = sig
        self.demos: list[dict] = []
        self.lm = lm
        self.params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        self.fill_missing = fill_missing
        self.format = get_format(format)  # tandem.program.formats: "fields" (default), "markers"

    @property
    def name(self) -> str:
        """This predictor's name in the program it runs in (tandem.program.module.predictor_name)."""
        return predictor_name(self)

    # -- the call -------------------------------------------------------------------
    def get_lm(self) -> LM:
        lm = self.lm or settings.lm
        if lm is None:
            raise RuntimeError(
                f"predictor {self.name!r} has no LM: call program.set_lm(lm) or "
                "tandem.settings.configure(lm=...) first"
            )
        return lm

    def sampling(self) -> SamplingParams:
        """This predictor's sampling settings, under any active ``sampling_override``."""
        override = _override.get()
        if override is None:
            return self.params
        return replace(self.params, **override)

    def request(self, inputs: dict, lm: LM | None = None) -> Request:
        lm = lm or self.get_lm()
        prompt = self.format.build_prompt(self.signature, self.demos, inputs, hint=_hint.get())
        return Request(lm.render(prompt), self.sampling(), prompt)

    def forward(self, **inputs: Any) -> Prediction:
        lm = self.get_lm()
        req = self.request(inputs, lm)
        assert req.prompt is not None
        t = current_trace()
        completion = lm.complete(req)
        if t is not None:
            t.usage.add(completion)
        reply = completion.text
        if self.fill_missing:
            reply = self._fill_missing(lm, req, reply, t)
        shown = {f.name: inputs[f.name] for f in self.signature.input_fields}
        try:
            outputs = self.format.parse(self.signature, req.prompt.prefix + reply)
        except ParseError:
            if t is not None:
                t.record_unparsed(predictor_name(self), shown, req.text, reply)
            raise
        if t is not None:
            t.record(predictor_name(self), shown, outputs, req.text, reply)
        return Prediction(outputs)

    def _fill_missing(self, lm: LM, req: Request, reply: str, t) -> str:
        """Ask for output fields the reply left out, one label at a time.

        Small models often write the first field and stop or ramble. Writing
        the next label ourselves and letting the model continue (the engine's
        prefix cache makes this cheap) gets a parseable reply; the completed
        reply is what a trace records, so fine-tuning teaches the model to
        write every field by itself.
        """
        for _ in range(len(self.signature.output_fields)):
            try:
                self.format.parse(self.signature, req.prompt.prefix + reply)
                return reply
            except ParseError as exc:
                all_missing = exc.missing
            field = next(f for f in self.signature.output_fields if f.name == all_missing[0])
            present = [f.name for f in self.signature.output_fields if f.name not in all_missing]
            if field.name != self.signature.output_fields[len(present)].name:
                return reply  # fields out of order: leave it to the parser to report
            reply = reply.rstrip() + self.format.opener(field)
            stop = () if field.multiline else ("\n",)
            cont = lm.complete(Request(req.text + reply, SamplingParams(
                req.params.temperature, min(req.params.max_tokens, 64 if stop else req.params.max_tokens), stop,
                req.params.seed)))
            if t is not None:
                t.usage.add(cont)
            reply += cont.text
        return reply

    def __call__(self, **inputs: Any) -> Prediction:
        return self.forward(**inputs)

    # -- state ------------------------------------------------------------------------
    @property
    def instructions(self) -> str:
        return self.signature.instructions

    @instructions.setter
    def instructions(self, text: str) -> None:
        self.signature = self.signature.with_instructions(text)

    def dump_state(self) -> dict:
        return {
            "signature": self.signature.to_dict(),
            "demos": copy.deepcopy(self.demos),
            "max_tokens": self.params.max_tokens,
            "temperature": self.params.temperature,
            "format": self.format.name,
        }

    def load_state(self, state: dict) -> "Predict":
        self.signature = Signature.from_dict(state["signature"])
        self.demos = copy.deepcopy(state.get("demos", []))
        self.params = SamplingParams(
            temperature=state.get("temperature", 0.0), max_tokens=state.get("max_tokens", 256)
        )
        self.format = get_format(state.get("format"))
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.signature!r}, demos={len(self.demos)})"


REASONING = Field(
    "reasoning", desc="think step by step, briefly", is_input=False, multiline=True
)


class ChainOfThought(Predict):
    """Predict with a ``reasoning`` output written before the other outputs."""

    def __init__(self, signature: Signature | str | type, **kwargs: Any) -> None:
        super().__init__(signature, **kwargs)
        if "reasoning" not in {f.name for f in self.signature.fields}:
            self.signature = self.signature.prepend_output(REASONING)
