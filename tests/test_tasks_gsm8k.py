"""GSM8K: loader, splits, number extraction, metric and the solver on FakeLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.lm.fake import FakeLM
from tandem.program import Example, Prediction, trace
from tandem.tasks.data import DataError, split
from tandem.tasks.gsm8k import (
    GSM8KSolver, extract_number, gsm8k_metric, load_gsm8k, parse_gsm8k_answer, read_gsm8k,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K = DATA / "gsm8k" / "train.jsonl"
needs_data = pytest.mark.skipif(not GSM8K.is_file(), reason=f"shared GSM8K data not found at {GSM8K}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def good(q: str = "What is 2+2?", a: str = "2+2 = <<2+2=4>>4\n#### 4") -> dict:
    return {"question": q, "answer": a}


# -- loading ------------------------------------------------------------------------------
@needs_data
def test_read_shared_file():
    rows = read_gsm8k(GSM8K)
    assert len(rows) == 7473
    first = rows[0]
    assert first.inputs() == {"question": first.question}
    assert first.answer == "72"
    assert "####" not in first.rationale and "<<" not in first.rationale
    assert first.rationale.endswith("72 clips altogether in April and May.")
    assert all(extract_number(r.answer) is not None and "," not in r.answer for r in rows)


@needs_data
def test_splits_default_sizes_disjoint_and_seeded():
    s = load_gsm8k(GSM8K.parent)  # a folder works as well as the file
    assert s.sizes() == {"train": 1000, "dev": 500, "test": 1319}
    qs = [set(e.question for e in part) for part in (s.train, s.dev, s.test)]
    assert not (qs[0] & qs[1]) and not (qs[0] & qs[2]) and not (qs[1] & qs[2])
    again = load_gsm8k(GSM8K)
    assert [e.question for e in again.test] == [e.question for e in s.test]
    # The held-out split does not move when the training sizes change...
    small = load_gsm8k(GSM8K, train=100, dev=50)
    assert [e.question for e in small.test] == [e.question for e in s.test]
    # ...but another seed gives another split.
    other = load_gsm8k(GSM8K, seed=1)
    assert [e.question for e in other.test] != [e.question for e in s.test]


def test_answer_commas_and_calculator_notes(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [
        good(a="He has 1,000+234 = <<1000+234=1234>>1,234 dollars.\n#### 1,234"),
        "",  # blank lines are skipped
        good(q="Debt?", a="#### -5"),
    ])
    rows = read_gsm8k(path)
    assert [r.answer for r in rows] == ["1234", "-5"]
    assert rows[0].rationale == "He has 1,000+234 = 1,234 dollars."
    assert parse_gsm8k_answer("x\n#### 3.5") == ("x", "3.5")


@pytest.mark.parametrize(
    "rows, line, words",
    [
        ([good(), '{"question": "q", "answer": "#### 1"', good()], 2, "invalid JSON"),
        ([good(), good(), {"question": "q"}], 3, "missing key"),
        ([good(), {"question": "q", "answer": 4}], 2, "'answer' should be str"),
        ([good(), {"question": "q", "answer": "no final line"}], 2, "####"),
        ([{"question": "q", "answer": "#### many"}], 1, "not a number"),
        ([good(), "[1, 2]"], 2, "expected a JSON object"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, rows, line, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_gsm8k(path)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}:" in msg and words in msg
    assert info.value.line == line and info.value.path == str(path)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_gsm8k(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_gsm8k(tmp_path / "empty.jsonl")


def test_split_helper():
    rows = list(range(20))
    a, b, rest = split(rows, (5, 3, None), seed=7)
    assert (len(a), len(b), len(rest)) == (5, 3, 12)
    assert sorted(a + b + rest) == rows
    assert split(rows, (5, 3, None), seed=7) == [a, b, rest]
    assert split(rows, (5, 10), seed=7)[0] == a  # earlier pieces ignore later sizes
    assert rows == list(range(20))  # input untouched
    with pytest.raises(DataError, match="need 21.*only 20"):
        split(rows, (20, 1), seed=0)
    with pytest.raises(ValueError, match="at most one"):
        split(rows, (None, None), seed=0)
    with pytest.raises(DataError, match="only 20"):
        split(rows, (21,), seed=0)


def test_too_few_rows_for_splits(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [good(q=f"q{i}") for i in range(10)])
    with pytest.raises(DataError, match="not enough rows"):
        load_gsm8k(path)
    s = load_gsm8k(path, train=None, dev=3, test=2)
    assert s.sizes() == {"train": 5, "dev": 3, "test": 2}


def test_test_file_gives_the_test_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [good(q=f"t{i}") for i in range(10)])
    test = write_jsonl(tmp_path / "test.jsonl", [good(q=f"x{i}") for i in range(4)])
    s = load_gsm8k(train, train=6, dev=4, test=None, test_path=test)
    assert [e.question for e in s.test] == ["x0", "x1", "x2", "x3"]
    assert s.sizes() == {"train": 6, "dev": 4, "test": 4}


# -- numbers and the metric ------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, value",
    [
        ("72", 72.0),
        ("72.0", 72.0),
        ("$1,234.50", 1234.5),
        ("1,000,000 people", 1_000_000.0),
        ("The answer is 18 dollars.", 18.0),
        ("She has 3 apples and 5 pears, so 8.", 8.0),
        ("$18", 18.0),
        ("-5", -5.0),
        ("It dropped to -$12 overnight", -12.0),
        ("10-5", 5.0),
        ("25%", 25.0),
        ("3.5.", 3.5),
        (".5 liters", 0.5),
        ("12, 15, 18", 18.0),
        ("no number here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_number(text, value):
    assert extract_number(text) == value


@pytest.mark.parametrize(
    "predicted, gold, score",
    [
        ("72", "72", 1.0),
        ("72.0", "72", 1.0),
        ("72.00 clips", "72", 1.0),
        ("$72", "72", 1.0),
        ("1,234", "1234", 1.0),
        ("The total is $1,234.", "1234", 1.0),
        ("about 70, precisely 72", "72", 1.0),
        ("73", "72", 0.0),
        ("72 or 73", "72", 0.0),  # the last number counts
        ("seventy-two", "72", 0.0),
        ("", "72", 0.0),
    ],
)
def test_metric(predicted, gold, score):
    ex = Example(question="q", answer=gold).with_inputs("question")
    assert gsm8k_metric(ex, Prediction(answer=predicted)) == score
    assert gsm8k_metric(ex, Prediction(answer=predicted), trace=[]) == score


def test_metric_tolerates_odd_predictions():
    ex = Example(question="q", answer="4").with_inputs("question")
    assert gsm8k_metric(ex, Prediction()) == 0.0
    assert gsm8k_metric(ex, None) == 0.0
    assert gsm8k_metric(ex, "4") == 1.0
    assert gsm8k_metric(ex, {"answer": 4}) == 1.0
    score = gsm8k_metric(ex, Prediction(answer="4"))
    assert type(score) is float and score == 1.0


# -- the program --------------------------------------------------------------------------------
def test_solver_on_fake_lm():
    def reply(text: str) -> str:
        if "48 of her friends" in text:
            return " 48 / 2 = 24 in May, 48 + 24 = 72.\nAnswer: 72 clips"
        return " I am not sure.\nAnswer: 5"

    lm = FakeLM(reply)
    program = GSM8KSolver().set_lm(lm)
    assert [name for name, _ in program.named_predictors()] == ["solve"]
    sig = program.solve.signature
    assert [f.name for f in sig.input_fields] == ["question"]
    assert [f.name for f in sig.output_fields] == ["reasoning", "answer"]
    assert "single number" in " ".join(f.desc for f in sig.output_fields)

    right = Example(question="Natalia sold clips to 48 of her friends in April ...", answer="72").with_inputs("question")
    wrong = Example(question="What is 2+2?", answer="4").with_inputs("question")
    with trace() as calls:
        pred = program(**right.inputs())
    assert gsm8k_metric(right, pred) == 1.0
    assert pred.reasoning.startswith("48 / 2")
    assert len(calls) == 1 and calls[0].predictor == "solve" and calls[0].call_index == 0
    assert "48 of her friends" in lm.prompts[-1] and "single number" in lm.prompts[-1]
    assert gsm8k_metric(wrong, program(**wrong.inputs())) == 0.0

    copy = program.deepcopy()
    copy.solve.instructions = "changed"
    assert program.solve.instructions != "changed" and copy.solve.lm is lm
