"""Merged checkpoints under TANDEM_HOME/merged: made once, reused, the newest TANDEM_MAX_MERGED kept."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

import tandem.lm.merge
from tandem.lm import merged_cache
from tandem.lm.merged_cache import merged_checkpoint, prune


@pytest.fixture
def fake_merge(monkeypatch, tmp_path):
    """merge_adapter replaced by one that writes a config.json and counts its calls."""
    calls = []

    def merge(model_dir, adapter_dir, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "tandem.json").write_text(json.dumps({"merged_from": {"adapter": str(adapter_dir)}}))
        calls.append(adapter_dir)
        return out_dir

    monkeypatch.setattr(tandem.lm.merge, "merge_adapter", merge)
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    return calls


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_text(text)
    return path


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_copy_is_merged_once_and_reused(fake_merge, tmp_path):
    base, adapter = _folder(tmp_path / "base", "b"), _folder(tmp_path / "a", "a")
    first = merged_checkpoint(base, adapter)
    assert merged_checkpoint(base, adapter) == first and fake_merge == [adapter]
    other = merged_checkpoint(base, _folder(tmp_path / "a2", "other weights"))
    assert other != first and len(fake_merge) == 2


def test_only_the_newest_copies_are_kept_and_none_used_within_the_hour_is_removed(fake_merge, tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_MAX_MERGED", "2")
    base = _folder(tmp_path / "base", "b")
    made = [merged_checkpoint(base, _folder(tmp_path / f"a{i}", f"adapter {i}")) for i in range(4)]
    assert all(p.exists() for p in made)  # all used within the hour: none removed
    for i, p in enumerate(made):  # a0 the oldest, a3 the newest, all older than an hour
        _age(p, 7200 - 60 * i)
    merged_checkpoint(base, tmp_path / "a0")  # used again: now the newest, not merged again
    assert len(fake_merge) == 4
    assert [p.exists() for p in made] == [True, False, False, True]


def test_prune_spares_the_copy_in_use_and_skips_partial_folders(tmp_path):
    root = tmp_path / "merged"
    old = [_folder(root / f"c{i}", "x") for i in range(3)]
    partial = _folder(root / ".c9.partial", "x")
    for i, p in enumerate(old):
        _age(p, 9000 - i)
    _age(partial, 9000)
    removed = prune(root, 1, spare=old[0])
    assert removed == [old[1]] and old[0].exists() and old[2].exists() and partial.exists()


@pytest.mark.parametrize("value", ["0", "-1", "four"])
def test_a_bad_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("TANDEM_MAX_MERGED", value)
    with pytest.raises(ValueError, match=f"TANDEM_MAX_MERGED: expected a positive integer, got '{value}'"):
        merged_cache.max_merged()


def test_a_copy_whose_adapter_folder_is_gone_is_removed_within_the_hour(fake_merge, tmp_path):
    """The RL step removes each adapter it stops serving; its merged copy goes at the next merge."""
    base = _folder(tmp_path / "base", "b")
    first = merged_checkpoint(base, _folder(tmp_path / "step1", "w1"))
    second = merged_checkpoint(base, _folder(tmp_path / "step2", "w2"))
    assert first.exists() and second.exists()  # step1 still exists: kept
    shutil.rmtree(tmp_path / "step1")
    third = merged_checkpoint(base, _folder(tmp_path / "step3", "w3"))
    assert not first.exists() and second.exists() and third.exists()


def test_reusing_a_copy_from_another_folder_with_the_same_adapter_keeps_it(fake_merge, tmp_path):
    base = _folder(tmp_path / "base", "b")
    made = merged_checkpoint(base, _folder(tmp_path / "run" / "adapter", "same weights"))
    saved = _folder(tmp_path / "program" / "adapter", "same weights")  # a saved program's copy
    assert merged_checkpoint(base, saved) == made and len(fake_merge) == 1
    shutil.rmtree(tmp_path / "run")
    merged_checkpoint(base, _folder(tmp_path / "other", "other weights"))
    assert made.exists()  # its record now names the saved program's folder


def test_a_copy_without_a_record_is_only_pruned_by_count_and_age(tmp_path):
    root = tmp_path / "merged"
    bare = _folder(root / "c0", "x")
    assert prune(root, 0) == [] and bare.exists()
