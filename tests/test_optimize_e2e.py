"""p -> w -> p on Iris with the real embedded model on vLLM (slow, in CI).

Small budgets keep it to a few minutes on 2 cores; the full-size runs are in
docs/results.md.
"""

from __future__ import annotations

import pytest

import tandem
from tandem.lm import Request
from tandem.lm.identity import is_full_checkpoint
from tandem.optimize import BetterTogether, BootstrapFinetune, RandomSearch, SplitPlan
from tandem.tasks.iris import IrisClassifier, iris_metric, load_iris, split_iris
from tandem.train import LoRAConfig

pytestmark = pytest.mark.slow


def test_p_w_p_on_iris_changes_weights_and_round_trips(smollm_vllm, tmp_path):
    splits = split_iris(load_iris(), seed=0, sizes=(30, 15, 10))
    bt = BetterTogether(
        iris_metric, strategy="p -> w -> p",
        prompt_optimizer=RandomSearch(iris_metric, num_candidates=3),
        # Samples and the gold answer as a hint: every training example gets a trace to learn from.
        # method "auto": SmolLM2-135M is trained in full (tandem.train.recipe), here for 2 epochs.
        weight_optimizer=BootstrapFinetune(iris_metric, config=LoRAConfig(epochs=2), attempts=3, hint_attempts=2),
        splits=SplitPlan(10, 20), run_dir=tmp_path / "run",
    )
    program = IrisClassifier().set_lm(smollm_vllm)
    result = bt.compile(program, trainset=splits["train"], valset=splits["dev"], seed=0)
    kinds = [(r.kind, r.status) for r in result.history]
    assert [k for k, _ in kinds] == ["start", "p", "w", "p"]  # history[0]: the given program on dev
    assert result.score >= result.history[0].val_score  # never worse than the start on dev
    w = result.history[2]
    assert w.status == "ok", w.detail
    assert w.train_examples >= 25, w.detail  # 30 examples, balanced by species
    assert w.trainable_params > 100_000_000, w.detail  # every weight of SmolLM2-135M
    assert sum(w.extra["bootstrap"][s] for s in ("greedy", "sampled", "hint", "none")) == 30

    final = result.extra["final_program"]
    tuned = final.classify.lm
    assert tuned.adapter is not None and is_full_checkpoint(tuned.adapter)  # served in the base's place
    # The weight step changed the model: the same zero-shot prompts get other replies.
    prompts = [IrisClassifier().classify.request(ex.inputs(), smollm_vllm).text for ex in splits["test"]]
    base_out = [c.text for c in smollm_vllm.generate([Request(p) for p in prompts])]
    tuned_out = [c.text for c in tuned.generate([Request(p) for p in prompts])]
    assert base_out != tuned_out

    # save -> load gives a program with the same outputs.
    final.save(tmp_path / "saved", seed=0)
    loaded = tandem.load(tmp_path / "saved", lms={"vllm:smollm2-135m": smollm_vllm})
    assert loaded.dump_state() == final.dump_state()
    ex = splits["test"][0]
    assert loaded(**ex.inputs()) == final(**ex.inputs())
    assert (tmp_path / "saved" / "adapters").is_dir()

