"""HotPotQA: loader, corpus, BM25 retrieval, EM/F1, and the multi-hop program on FakeLM."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tandem.lm.fake import FakeLM
from tandem.program import Example, Prediction, trace
from tandem.tasks.data import DataError
from tandem.tasks.hotpotqa import (
    MultiHopQA, answer_exact_match, answer_f1, build_corpus, gold_title_recall, hotpotqa_em,
    hotpotqa_f1, load_hotpotqa, normalize_answer, read_hotpotqa,
)
from tandem.tasks.retrieval import BM25Retriever, Passage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HOTPOT = DATA / "hotpotqa"
needs_data = pytest.mark.skipif(
    not (HOTPOT / "train.jsonl").is_file(), reason=f"shared HotPotQA data not found at {HOTPOT}"
)


def row(i: int = 0, **over) -> dict:
    r = {
        "_id": f"id{i}",
        "question": f"Which city was the designer of tower {i} born in?",
        "answer": "Dijon",
        "type": "bridge",
        "level": "hard",
        "supporting_facts": [[f"Tower {i}", 0], ["Gustave Eiffel", 0]],
        "context": [
            [f"Tower {i}", [f"Tower {i} was designed by Gustave Eiffel.", " It is tall."]],
            ["Gustave Eiffel", ["Gustave Eiffel was born in Dijon."]],
            ["Lyon", ["Lyon is a city in France."]],
        ],
    }
    r.update(over)
    return r


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def shared():
    if not (HOTPOT / "train.jsonl").is_file():
        pytest.skip(f"shared HotPotQA data not found at {HOTPOT}")
    data = load_hotpotqa(HOTPOT)
    return data, data.retriever()


# -- loading ------------------------------------------------------------------------------------
@needs_data
def test_read_shared_files():
    train, dev = read_hotpotqa(HOTPOT / "train.jsonl"), read_hotpotqa(HOTPOT / "dev.jsonl")
    assert (len(train), len(dev)) == (600, 300)


def test_load_splits_examples_and_corpus(shared):
    data, _ = shared
    assert data.sizes() == {"train": 400, "dev": 200, "test": 300}
    ex = data.test[0]
    assert ex.input_keys == ("question",)
    assert set(ex) >= {"question", "answer", "gold_titles", "id", "type", "level"}
    ids = [set(e.id for e in part) for part in (data.train, data.dev, data.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    # Every gold paragraph is in the pooled corpus, once per title.
    titles = [p.title for p in data.corpus]
    assert len(titles) == len(set(titles)) > 8000
    have = set(titles)
    assert all(t in have for part in (data.train, data.dev, data.test) for e in part for t in e.gold_titles)
    p = next(p for p in data.corpus if p.title == ex.gold_titles[0])
    assert p.text.startswith(f"{p.title} | ") and "  " not in p.text[: len(p.title) + 4]


def test_corpus_dedups_by_title_first_wins():
    rows = [row(0), row(1), row(2, context=[["Lyon", ["A different Lyon text."]]])]
    corpus = build_corpus(rows)
    assert [p.title for p in corpus] == ["Tower 0", "Gustave Eiffel", "Lyon", "Tower 1"]
    assert corpus[0].text == "Tower 0 | Tower 0 was designed by Gustave Eiffel. It is tall."
    assert corpus[2].text == "Lyon | Lyon is a city in France."


def test_json_array_and_jsonl_load_the_same(tmp_path):
    rows = [row(i) for i in range(3)]
    a = read_hotpotqa(write_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "c.json").write_text(json.dumps(rows))  # the official files are one line
    assert read_hotpotqa(tmp_path / "b.json") == a == read_hotpotqa(tmp_path / "c.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        read_hotpotqa(tmp_path / "empty.json")


def _bad_rows():
    no_answer = row(1)
    del no_answer["answer"]
    return [
        ([row(0), "{not json", row(2)], 2, "invalid JSON"),
        ([row(0), no_answer], 2, "missing key(s) ['answer']"),
        ([row(0), row(1), row(2, context="Lyon")], 3, "'context' should be list"),
        ([row(0), row(1, context=[["Lyon", "Lyon is a city."]])], 2, "context[0] should be [title, [sentences]]"),
        ([row(0, supporting_facts=[["Lyon", "0"]])], 1, "supporting_facts[0]"),
        ([row(0, level=3)], 1, "'level' should be str"),
        ([row(0, supporting_facts=[])], 1, "supporting_facts is empty"),
    ]


@pytest.mark.parametrize("rows, line, words", _bad_rows())
def test_malformed_jsonl_names_file_and_line(tmp_path, rows, line, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_hotpotqa(path)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}:" in msg and words in msg


def test_malformed_json_array_names_the_line(tmp_path):
    rows = [row(0), row(1), row(2)]
    del rows[2]["context"]
    path = tmp_path / "bad.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    with pytest.raises(DataError, match=r"bad\.json, line 4: missing key\(s\) \['context'\]"):
        read_hotpotqa(path)
    path.write_text("[\n" + json.dumps(row(0)) + ",\n{broken\n]")
    with pytest.raises(DataError, match=r"bad\.json, line 3: invalid JSON"):
        read_hotpotqa(path)
    path.write_text("[\n" + json.dumps(row(0)) + ",\n")
    with pytest.raises(DataError, match="invalid JSON"):
        read_hotpotqa(path)


def test_splits_without_test_file(tmp_path):
    path = write_jsonl(tmp_path / "only.jsonl", [row(i) for i in range(10)])
    data = load_hotpotqa(path, train=None, dev=3, test=2, seed=1)
    assert data.sizes() == {"train": 5, "dev": 3, "test": 2}
    again = load_hotpotqa(path, train=1, dev=1, test=2, seed=1)
    assert [e.id for e in again.test] == [e.id for e in data.test]
    with pytest.raises(DataError, match="not enough rows"):
        load_hotpotqa(path)  # the defaults want 600 rows


# -- metrics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pred, gold, em, f1",
    [
        ("The Eiffel Tower", "eiffel tower", 1.0, 1.0),
        ("Eiffel Tower.", "the Eiffel Tower", 1.0, 1.0),
        ("U.S.", "US", 1.0, 1.0),
        ("Paris, France", "Paris", 0.0, 2 / 3),
        ("the cat sat", "a cat sat down", 0.0, 0.8),
        ("the the cat", "cat cat", 0.0, 2 / 3),
        ("London", "Paris", 0.0, 0.0),
        ("Yes.", "yes", 1.0, 1.0),
        ("yes", "no", 0.0, 0.0),
        ("no", "no way", 0.0, 0.0),  # token overlap, but a yes/no answer must match exactly
        ("yes it is", "yes", 0.0, 0.0),
        ("noanswer", "no answer", 0.0, 0.0),
        ("", "Paris", 0.0, 0.0),
    ],
)
def test_official_em_f1(pred, gold, em, f1):
    assert answer_exact_match(pred, gold) == em
    assert answer_f1(pred, gold) == pytest.approx(f1)
    ex = Example(question="q", answer=gold).with_inputs("question")
    assert hotpotqa_em(ex, Prediction(answer=pred)) == em
    assert hotpotqa_f1(ex, Prediction(answer=pred), trace=[]) == pytest.approx(f1)


def test_normalize_and_odd_predictions():
    assert normalize_answer("  An apple, THE  tree!  ") == "apple tree"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    ex = Example(question="q", answer="Paris").with_inputs("question")
    assert hotpotqa_em(ex, Prediction()) == 0.0
    assert hotpotqa_em(ex, "paris") == 1.0
    multi = Example(question="q", answer=["NYC", "New York City"]).with_inputs("question")
    assert hotpotqa_em(multi, Prediction(answer="new york city")) == 1.0


def test_gold_title_recall():
    ex = Example(question="q", answer="a", gold_titles=["A", "B"]).with_inputs("question")
    assert gold_title_recall(ex, Prediction(answer="a", retrieved_titles=["A", "C", "B"])) == 1.0
    assert gold_title_recall(ex, Prediction(answer="a", retrieved_titles=["B", "C"])) == 0.5
    assert gold_title_recall(ex, Prediction(answer="a")) == 0.0


# -- retrieval --------------------------------------------------------------------------------------
def test_retriever_finds_gold_paragraph_by_title(shared):
    data, retriever = shared
    found = total = 0
    for ex in data.test[:50]:
        for title in ex.gold_titles:
            total += 1
            found += title in [p.title for p in retriever.search(title, k=3)]
    assert found >= 0.95 * total, f"{found}/{total} gold titles in the top 3"
    ex = data.test[0]
    hits = retriever.search(f'"{ex.gold_titles[0]}" {ex.question}', k=3)
    assert ex.gold_titles[0] in [p.title for p in hits]
    assert all(isinstance(p, Passage) for p in hits) and len(hits) == 3


def test_retriever_is_thread_safe(shared):
    data, retriever = shared
    queries = [e.question for e in data.dev[:40]]
    alone = [[p.title for p in retriever.search(q, 3)] for q in queries]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: [p.title for p in retriever.search(q, 3)], queries * 2))
    assert together == alone * 2


def test_retriever_edge_cases():
    passages = [Passage("A", "A | apples and pears"), Passage("B", "B | pears"), Passage("C", "C | plums")]
    r = BM25Retriever(passages)
    assert [p.title for p in r.search("pears apples", 2)] == ["A", "B"]
    assert len(r.search("pears", 10)) == 3  # k larger than the corpus
    assert [p.title for p in r.search("zebra", 2)] == ["A", "B"]  # no word matches: corpus order
    assert [p.title for p in r.search("", 2)] == ["A", "B"]
    assert r.search("pears", 0) == []
    with pytest.raises(ValueError):
        BM25Retriever([])


def test_import_tandem_does_not_import_bm25s():
    code = "import sys, tandem, tandem.tasks, tandem.tasks.hotpotqa; print('bm25s' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the multi-hop program --------------------------------------------------------------------------
PASSAGES = [
    Passage("Eiffel Tower", "Eiffel Tower | The Eiffel Tower is a lattice tower in Paris built by the company of Gustave Eiffel."),
    Passage("Gustave Eiffel", "Gustave Eiffel | Alexandre Gustave Eiffel was a French civil engineer born in Dijon."),
    Passage("Louvre", "Louvre | The Louvre is the world's most visited museum, in Paris."),
    Passage("Dijon", "Dijon | Dijon is a city in eastern France, famous for mustard."),
    Passage("Lyon", "Lyon | Lyon is the third-largest city of France."),
    Passage("Statue of Liberty", "Statue of Liberty | Its iron framework was designed by Gustave Eiffel."),
    Passage("Big Ben", "Big Ben | Big Ben is the nickname of the clock tower in London."),
]


def scripted(text: str) -> str:
    """Answers by which predictor's prompt it sees (the system message names its fields)."""
    if "You are given: Question." in text:
        return " Start from the tower.\nSearch Query: Eiffel Tower Paris"
    if "You are given: Context, Question." in text and "Search Query:" in text:
        return " The tower was built by Gustave Eiffel's company.\nSearch Query: Gustave Eiffel engineer born"
    return " Eiffel was born in Dijon.\nAnswer: Dijon"


def test_multihop_program_on_fake_lm():
    lm = FakeLM(scripted)
    program = MultiHopQA(BM25Retriever(PASSAGES)).set_lm(lm)
    names = [n for n, _ in program.named_predictors()]
    assert names == ["generate_query[0]", "generate_query[1]", "generate_answer"]

    ex = Example(
        question="In which city was the engineer whose company built the Eiffel Tower born?",
        answer="Dijon", gold_titles=["Eiffel Tower", "Gustave Eiffel"],
    ).with_inputs("question")
    with trace() as calls:
        pred = program(**ex.inputs())

    assert [(c.predictor, c.call_index) for c in calls] == [
        ("generate_query[0]", 0), ("generate_query[1]", 0), ("generate_answer", 0),
    ]
    q1, q2 = calls[0].outputs["search_query"], calls[1].outputs["search_query"]
    assert q1 != q2 and pred.search_queries == [q1, q2]
    # Hop 2 sees hop 1's passages; the answer module sees both hops' passages, once each.
    hop1 = [p.title for p in program.retriever.search(q1, 3)]
    assert "Eiffel Tower" in hop1
    assert all(t in calls[1].prompt for t in hop1)
    assert "Gustave Eiffel | Alexandre Gustave Eiffel was a French civil engineer born in Dijon." in calls[2].prompt
    assert "Eiffel Tower | The Eiffel Tower is a lattice tower" in calls[2].prompt
    hop2 = [p.title for p in program.retriever.search(q2, 3)]
    assert set(hop1) & set(hop2), "the script should make the hops overlap, to test dedup"
    assert pred.retrieved_titles == hop1 + [t for t in hop2 if t not in hop1]
    assert [c.split(" | ")[0] for c in calls[2].inputs["context"]] == pred.retrieved_titles
    assert hotpotqa_em(ex, pred) == 1.0 and gold_title_recall(ex, pred) == 1.0
    assert pred.reasoning == "Eiffel was born in Dijon."


def test_multihop_deepcopy_shares_retriever_and_hops_are_separate():
    program = MultiHopQA(BM25Retriever(PASSAGES))
    copy = program.deepcopy()
    assert copy.retriever is program.retriever
    assert copy.generate_query[0] is not program.generate_query[0]
    copy.generate_query[1].instructions = "changed"
    assert program.generate_query[1].instructions != "changed"
    assert program.generate_query[0].signature != program.generate_query[1].signature
    assert set(program.dump_state()) == {"generate_query[0]", "generate_query[1]", "generate_answer"}


def test_multihop_shortens_long_passages_and_supports_more_hops():
    long = [Passage(p.title, p.text + " filler" * 300) for p in PASSAGES]
    program = MultiHopQA(BM25Retriever(long), k=1, hops=3, max_passage_chars=100).set_lm(FakeLM(scripted))
    with trace() as calls:
        pred = program(question="Where was the engineer of the Eiffel Tower born?")
    assert [c.predictor for c in calls] == [
        "generate_query[0]", "generate_query[1]", "generate_query[2]", "generate_answer",
    ]
    assert [c.call_index for c in calls] == [0, 0, 0, 0]
    context = calls[-1].inputs["context"]
    assert len(context) == len(pred.retrieved_titles) >= 1
    assert all(len(c) <= 104 and c.endswith(" ...") for c in context)
    with pytest.raises(ValueError):
        MultiHopQA(BM25Retriever(PASSAGES), hops=0)


# -- the real embedded model (slow) -------------------------------------------------------------
@pytest.mark.slow
def test_real_model_multihop_run_and_prompt_step(shared, smollm_vllm):
    """A small real HotPotQA run: the three-module program on SmolLM2 over BM25 of the local
    corpus, evaluated, then one prompt step (bootstrap + 2 candidates)."""
    from tandem.evaluate import evaluate
    from tandem.optimize import RandomSearch
    from tandem.program.render import ParseError

    data, retriever = shared
    program = MultiHopQA(retriever).set_lm(smollm_vllm)
    dev = data.dev[:6]
    for ex in dev:  # the first question the 135M model gets through (a weak model may garble a field)
        try:
            with trace() as calls:
                pred = program(**ex.inputs())
            break
        except ParseError:
            continue
    else:
        pytest.fail("no dev question got through all three modules")
    assert [c.predictor for c in calls] == ["generate_query[0]", "generate_query[1]", "generate_answer"]
    assert len(pred.search_queries) == 2 and 3 <= len(pred.retrieved_titles) <= 6
    for title in pred.retrieved_titles:  # the retrieved passages reach the answer module's prompt
        assert title in calls[2].prompt

    result = evaluate(program, dev, hotpotqa_em, num_threads=6)
    assert result.n == 6 and set(result.failures) <= {"parse"}  # a weak model may garble a field
    assert result.usage.calls >= 3 * (6 - result.failures.get("parse", 0))
    done = [r for r in result.records if r.prediction is not None]
    assert done and all(len(r.prediction["retrieved_titles"]) >= 3 for r in done)
    assert gold_title_recall(ex, pred) in (0.0, 0.5, 1.0)  # two gold titles per question

    out = RandomSearch(hotpotqa_em, num_candidates=2, max_demos=1, num_threads=8).compile(
        program, trainset=data.train[:4], valset=data.train[4:8], seed=0
    )
    rec = out.history[0]
    assert rec.kind == "p" and len(rec.extra["candidates"]) == 2 and rec.usage["calls"] > 0
    assert [n for n, _ in out.program.named_predictors()] == [n for n, _ in program.named_predictors()]
