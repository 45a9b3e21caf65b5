"""Stand-ins shared by the orchestration tests."""

from __future__ import annotations

import re
from pathlib import Path

from tandem import ChainOfThought, Example, Module
from tandem.train import TrainResult


class Mod3(Module):
    """One chain-of-thought predictor: x -> x modulo 3."""

    def __init__(self):
        self.solve = ChainOfThought("x -> y", instructions="Give x modulo 3.")

    def forward(self, x):
        return self.solve(x=x)


def data(n, start=0):
    """``n`` examples x -> x % 3, from ``start``."""
    return [Example(x=str(i), y=str(i % 3)).with_inputs("x") for i in range(start, start + n)]


def metric(ex, pred, trace=None):
    return ex.y == pred.y


def read_x(text):
    """The last ``X: n`` of a rendered prompt."""
    return int(re.findall(r"X: (\d+)", text)[-1])


def fake_trainer(calls: list):
    """A ``train_lora`` stand-in: writes an adapter folder, records each call's examples."""

    def train(model_dir, examples, cfg, out_dir, progress=None, overwrite=False):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text("{}")
        calls.append(list(examples))
        return TrainResult(out, len(examples), 0, 1, 10, 20, [1.0], 0.1, 1234, False, "eager")

    return train


def one_error_line(capsys) -> str:
    """The single line of stderr, which starts with ``error:`` (the CLI's one-line errors)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]
