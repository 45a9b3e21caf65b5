"""Backends and tasks from another package, through the ``tandem.backends`` and ``tandem.tasks``
entry points: tests/plugin_pkg is installed with pip into a temporary folder (no network)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.lm import TrainableLM
from tandem.lm.caching import CachedLM
from tandem.lm.registry import backend_names, get_lm
from tandem.tasks.registry import get_task, task_names

PLUGIN_PKG = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    source = shutil.copytree(PLUGIN_PKG, tmp_path_factory.mktemp("src") / "plugin_pkg")  # builds write beside it
    # --no-build-isolation and --no-index: setuptools from this environment, nothing downloaded.
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
           "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=source, timeout=300)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    importlib.invalidate_caches()
    from tandem.lm import registry as lm_registry
    from tandem.tasks import registry as task_registry

    lm_registry._BACKENDS.pop("echo", None)
    task_registry._FACTORIES.pop("parity", None)
    for name in [m for m in sys.modules if m.startswith("tandem_test_plugin")]:
        del sys.modules[name]


def test_a_backend_from_another_package(plugin):
    assert "echo" in backend_names()
    lm = get_lm("echo:m1", cache=False, temperature_unused=1)
    assert isinstance(lm, CachedLM) and isinstance(lm, TrainableLM)  # wrapped like every backend
    assert type(lm.inner).__module__ == "tandem_test_plugin" and lm.options == {"temperature_unused": 1}
    assert lm.spec() == {"backend": "echo", "model": "m1", "adapter": None}
    tuned = lm.with_adapter("a1")
    assert tuned.fingerprint() == "echo:m1:a1" and isinstance(tuned, CachedLM)


def test_a_task_from_another_package_evaluated_on_the_plugin_backend(plugin, capsys):
    assert "parity" in task_names()
    task = get_task("parity")
    assert task.name == "parity" and task.sizes == (4, 4, 4)
    from tandem.cli import main

    assert main(["eval", "parity", "--model", "echo:m", "--split", "dev"]) == 0
    out = capsys.readouterr().out
    assert "100.0" in out  # the echo backend answers every parity question right


def test_an_unknown_name_lists_what_is_installed(plugin):
    from tandem.tasks.registry import UnknownTaskError

    with pytest.raises(UnknownTaskError, match="parity"):
        get_task("no-such-task")
