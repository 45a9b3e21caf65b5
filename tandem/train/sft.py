"""Supervised fine-tuning data: prompt -> completion pairs and their tokens.

An ``SFTExample`` is one LM call as the engine saw it: ``prompt`` is the fully
rendered text (chat template, demos, the assistant prefix such as
``"Reasoning:"``) and ``completion`` is the text generated after it. Training
teaches the model to produce ``completion`` + EOS given ``prompt``.

Prompt and completion are tokenized separately and then joined. That is how
they reached the model at inference: the engine tokenized the prompt alone
and then generated the completion token by token, so tokenizing the joined
text could merge tokens across the boundary that the model never saw merged.

Examples longer than ``max_length`` tokens are dropped (never cut: a cut
completion would teach the model to stop mid-answer, a cut prompt would teach
it to answer a question it was not shown), and the number dropped is logged
as a warning and returned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTExample:
    prompt: str  # rendered prompt, assistant prefix included
    completion: str  # generated text that follows the prompt
    module: str = ""  # predictor name, for per-module counts in pooled training


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + completion + EOS; loss positions are ``n_prompt:``."""

    input_ids: tuple[int, ...]
    n_prompt: int
    module: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_completion(self) -> int:
        """Completion tokens, EOS included: the tokens the loss is computed on."""
        return len(self.input_ids) - self.n_prompt

    @property
    def completion_mask(self) -> list[bool]:
        return [i >= self.n_prompt for i in range(len(self.input_ids))]


def eos_token_id(tokenizer) -> int:
    """The token that ends a reply. For chat models this is the end-of-turn token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no EOS token; "
            "the model could not learn where a completion stops"
        )
    return int(eos)


def tokenize_example(tokenizer, example: SFTExample) -> TokenizedExample:
    # The rendered prompt already holds any BOS / turn tokens the chat template
    # writes, so the tokenizer must not add its own.
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    ids = tuple(prompt_ids) + tuple(completion_ids) + (eos_token_id(tokenizer),)
    return TokenizedExample(ids, len(prompt_ids), example.module)


def tokenize_examples(
    tokenizer, examples: Iterable[SFTExample], max_length: int
) -> tuple[list[TokenizedExample], int]:
    """Tokenize ``examples``; drop those over ``max_length`` tokens.

    Returns ``(kept, n_dropped)``. Dropping is logged as a warning with the
    count and the longest length seen, so that a too-small ``max_length`` is
    noticed rather than quietly shrinking the training set.
    """
    kept: list[TokenizedExample] = []
    dropped: list[int] = []
    for ex in examples:
        tok = tokenize_example(tokenizer, ex)
        if len(tok) > max_length:
            dropped.append(len(tok))
        elif tok.n_prompt == 0:
            raise ValueError("an SFT example has an empty prompt; a completion needs a prompt to follow")
        else:
            kept.append(tok)
    if dropped:
        log.warning(
            "dropped %d of %d SFT examples longer than max_length=%d tokens (longest %d); "
            "raise LoRAConfig.max_length or shorten the prompts to keep them",
            len(dropped), len(dropped) + len(kept), max_length, max(dropped),
        )
    return kept, len(dropped)
