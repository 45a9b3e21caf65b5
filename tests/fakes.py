"""Stand-ins shared by the orchestration tests."""

from __future__ import annotations

from pathlib import Path

from tandem.train import TrainResult


def fake_trainer(calls: list):
    """A ``train_lora`` stand-in: writes an adapter folder, records each call's examples."""

    def train(model_dir, examples, cfg, out_dir, progress=None, overwrite=False):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text("{}")
        calls.append(list(examples))
        return TrainResult(out, len(examples), 0, 1, 10, 20, [1.0], 0.1, 1234, False, "eager")

    return train
