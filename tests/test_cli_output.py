"""What the CLI prints reads at 80 columns and in a log file (issue #16, item 6).

Tables fit an 80-column terminal with whole headers; where the output is not
a terminal (a log file, a pipe, CI), progress goes out as periodic plain lines
instead of nothing until the end.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tandem.cli import main
from tandem.cli_output import progress, result_table, steps_table
from tandem.evaluate import EvalResult
from tandem.lm import FakeLM
from tandem.optimize.base import StepRecord

LONG = ("trained on 51 examples; 50 of 50 examples passed (20 greedily, 29 by sampling, 1 with the answer as a "
        "hint, 0 not at all); 50 passing traces from 121 runs (balanced by answer); kept zero-shot prompts (28.6)")
HISTORY = [
    StepRecord(0, "start", "ok", 0.0, None, 42.5, {"calls": 150, "prompt_tokens": 21600, "output_tokens": 1700},
               detail="the given program"),
    StepRecord(1, "p", "ok", 42.0, 48.6, 123.6, {"calls": 466, "prompt_tokens": 129156, "output_tokens": 5565},
               8, detail="chose random-5(k=3) (48.6); 8 of 15 bootstrap runs passed"),
    StepRecord(2, "w", "ok", 32.0, 28.6, 4069.0, {"calls": 12430, "prompt_tokens": 6075500, "output_tokens": 288600},
               51, detail=LONG),
    StepRecord(3, "w", "nothing_to_train", None, None, 98.3, {}, 0, detail="no passing traces [lora] rank 32"),
    StepRecord(4, "p", "failed", None, None, 1.0, {}, 0, detail="ValueError: boom"),
]


def render(renderable, width: int = 80) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue().splitlines()


def words(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


def test_the_steps_table_fits_80_columns_with_whole_headers():
    lines = render(steps_table(HISTORY, "iris: p -> w -> p (seed 0)"))
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    header = next(line for line in lines if "step" in line and "kind" in line)
    for name in ("step", "kind", "status", "dev %", "inner %", "wall s", "LM calls", "tokens", "SFT ex"):
        assert name in header, (name, header)
    assert "…" not in "\n".join(lines)
    text = words(lines)
    for r in HISTORY:  # every detail in full, readable (not one word a line), markup-free
        assert f"{r.index} {r.kind}: {r.detail}" in text
    row: dict[str, str] = {}  # the table's rows come before the details
    for line in lines:
        if line.split() and line.split()[0] in "01234":
            row.setdefault(line.split()[0], line)
    assert row["3"].split()[1:4] == ["w", "nothing", "to"] and row["4"].split()[1:3] == ["p", "failed"]
    assert "6,364,100" in text  # the big token count, whole
    detail_lines = [line for line in lines if "trained on 51" in line or "passing traces" in line]
    assert detail_lines and all(len(line.split()) > 3 for line in detail_lines)


def test_the_eval_table_fits_80_columns_with_whole_headers():
    result = EvalResult(score=42.0, correct=21.0, n=50, records=[], wall_s=12.3,
                        failures={"parse": 2})
    result.usage.calls, result.usage.prompt_tokens, result.usage.output_tokens = 52, 1_234_567, 98_765
    lines = render(result_table(result, "iris / dev / vllm:smollm2-135m"))
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    for name in ("score %", "correct", "n", "failed", "wall s", "LM calls", "cached", "prompt tok", "output tok"):
        assert name in text, name
    assert "…" not in text and "1,234,567" in text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_non_terminal_is_periodic_plain_lines():
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, width=80)
    assert not console.is_terminal
    with progress(console, interval_s=10, clock=clock) as update:
        update("bootstrap", 0, 50)  # a phase starts: one line
        for done in range(1, 51):
            clock.now += 0.5  # 25 s in all: lines at 10 s and 20 s, and at the end
            update("bootstrap", done, 50)
        clock.now += 1
        update("training", 0, 0)  # an unknown total
        clock.now += 12
        update("training", 7, 0)
        update("bootstrap", 0, 40)  # a label again (the next step): a new phase, elapsed from here
        clock.now += 3
        update("bootstrap", 40, 40)
    lines = out.getvalue().splitlines()
    assert lines == [
        "bootstrap: 0/50 (0 s)",
        "bootstrap: 20/50 (10 s)",
        "bootstrap: 40/50 (20 s)",
        "bootstrap: 50/50 (25 s)",
        "training: 0 (0 s)",
        "training: 7 (12 s)",
        "bootstrap: 0/40 (0 s)",
        "bootstrap: 40/40 (3 s)",
    ]


def test_progress_lines_ignore_counts_that_threads_report_out_of_order():
    out, clock = io.StringIO(), Clock()
    with progress(Console(file=out, width=80), interval_s=10, clock=clock) as update:
        for done in (1, 3, 2, 4, 6, 5):  # one phase, counted by several threads
            clock.now += 1
            update("candidates", done, 6)
        update("candidates", 5, 6)
        clock.now += 20
        update("candidates", 1, 6)  # after it finished: the next step's candidates
    assert out.getvalue().splitlines() == ["candidates: 1/6 (0 s)", "candidates: 6/6 (4 s)", "candidates: 1/6 (0 s)"]


def test_progress_lines_are_printed_literally():
    out = io.StringIO()
    with progress(Console(file=out, width=80), prefix="evaluating ") as update:
        update("[lora] A", 1, 1)
    assert out.getvalue() == "evaluating [lora] A: 1/1 (0 s)\n"


def test_progress_on_a_terminal_draws_bars():
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    with progress(console) as update:
        update("bootstrap", 3, 10)
    assert "3/10" in out.getvalue() and "bootstrap: 3/10" not in out.getvalue()


# -- the commands, with stderr a file (not a terminal) ------------------------------------------------
def iris_reply(text: str) -> str:
    return " small petals\nSpecies: setosa"


@pytest.fixture
def fake_backend(monkeypatch):
    import tandem.lm.registry as registry

    monkeypatch.setitem(registry._BACKENDS, "fake", lambda model, **options: FakeLM(iris_reply, name=model))


def test_eval_in_a_log_prints_progress_lines_and_a_table_that_fits(fake_backend, capsys):
    assert main(["eval", "iris", "--model", "fake:m", "--set", "sizes=6,6,6"]) == 0
    captured = capsys.readouterr()
    assert "evaluating: 6/6 (" in captured.err
    assert "━" not in captured.err  # no bar drawn into the log
    lines = captured.out.splitlines()
    assert lines and max(len(line) for line in lines) <= 80
    assert "prompt tok" in captured.out and "output tok" in captured.out


def test_optimize_in_a_log_prints_progress_lines_and_a_steps_table_that_fits(fake_backend, tmp_path, capsys):
    assert main(["optimize", "iris", "--model", "fake:m", "--strategy", "p", "--run-dir", str(tmp_path / "run"),
                 "--set", "sizes=6,6,6", "--set", "num_candidates=2", "--set", "threads=4"]) == 0
    captured = capsys.readouterr()
    assert "━" not in captured.err and "model fake:m: train 6" in captured.err  # not an emoji code
    assert any(line.startswith("candidates: ") for line in captured.err.splitlines()), captured.err
    assert any(line.startswith("test: 6/6 (") for line in captured.err.splitlines()), captured.err
    lines = captured.out.splitlines()
    assert max(len(line) for line in lines) <= 80, captured.out
    assert "SFT ex" in captured.out and "returned program" in captured.out
    assert " points [" in captured.out and "McNemar p" in captured.out  # the test vs zero-shot, with its interval
