"""Quiet by default (tandem.quiet): what ``import tandem`` sets for the libraries under it, and
what ``TANDEM_LOG`` changes. Each check runs in a fresh interpreter, as a user's program would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPORT = r"""
import json, logging, os, warnings
import tandem
from tandem import quiet

def shown(module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("noise", FutureWarning, "x.py", 1, module=module, registry={})
    return len(caught)

print(json.dumps({
    "env": {k: os.environ.get(k) for k in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL",
                                           "PYTHONWARNINGS", "TRANSFORMERS_NO_ADVISORY_WARNINGS",
                                           "VLLM_LOGGING_STREAM")},
    "vllm": logging.getLogger("vllm").level, "transformers": logging.getLogger("transformers").level,
    "tandem": logging.getLogger("tandem").level,
    "vllm_warning": shown("vllm.triton_utils.dispatcher"), "user_warning": shown("myscript"),
    "bars": quiet.progress_bars(),
}))
"""


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TANDEM_LOG", "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL",
                        "PYTHONWARNINGS", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_VERBOSITY",
                        "VLLM_LOGGING_STREAM")}
    env.update(extra)
    return env


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(**env),
                          timeout=120)


def _report(code: str = REPORT, **env: str) -> dict:
    p = _run(code, **env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_quiets_the_libraries():
    r = _report()
    assert r["env"]["VLLM_LOGGING_LEVEL"] == "ERROR"
    assert r["env"]["TRANSFORMERS_VERBOSITY"] == "error"
    assert r["env"]["TORCH_CPP_LOG_LEVEL"] == "ERROR"  # torch's C++ warnings (NUMA binding)
    assert r["env"]["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"
    assert r["env"]["PYTHONWARNINGS"] == "ignore::UserWarning:multiprocessing.resource_tracker"
    assert r["vllm"] == r["transformers"] == 40  # ERROR
    assert r["tandem"] == 0  # tandem's own lines follow the program's logging setup
    assert r["vllm_warning"] == 0
    assert r["user_warning"] == 1, "the user's own warnings are not tandem's to hide"
    assert r["bars"] is False


def test_tandem_log_shows_the_libraries():
    r = _report(TANDEM_LOG="info")
    assert r["env"]["VLLM_LOGGING_LEVEL"] == "INFO"
    assert r["env"]["TRANSFORMERS_NO_ADVISORY_WARNINGS"] is None
    assert r["env"]["PYTHONWARNINGS"] is None
    assert r["vllm"] == r["tandem"] == 20
    assert r["vllm_warning"] == 1
    assert r["bars"] is True


def test_user_settings_win():
    r = _report(VLLM_LOGGING_LEVEL="DEBUG", PYTHONWARNINGS="error::RuntimeWarning")
    assert r["env"]["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert r["env"]["PYTHONWARNINGS"] == ("error::RuntimeWarning,"
                                          "ignore::UserWarning:multiprocessing.resource_tracker")


def test_configure_after_import_switches_level_and_back():
    """``tandem -v`` raises the level after ``import tandem`` quieted everything."""
    code = REPORT.replace("import tandem\n", "import tandem\nfrom tandem import quiet\nquiet.configure('debug')\n")
    r = _report(code)
    assert r["env"]["VLLM_LOGGING_LEVEL"] == "DEBUG" and r["vllm"] == 10 and r["vllm_warning"] == 1
    code = code.replace("quiet.configure('debug')\n", "quiet.configure('debug')\nquiet.configure()\n")
    r = _report(code)
    assert r["env"]["VLLM_LOGGING_LEVEL"] == "ERROR" and r["vllm"] == 40 and r["vllm_warning"] == 0


def test_unknown_tandem_log_is_one_line_and_stays_quiet():
    p = _run("import tandem, os; print(os.environ['VLLM_LOGGING_LEVEL'])", TANDEM_LOG="loud")
    assert p.returncode == 0
    assert p.stdout.strip() == "ERROR"
    assert p.stderr.strip().splitlines() == [
        "TANDEM_LOG='loud': expected one of debug, info, warning, error (or unset: quiet)"]


def test_cli_with_an_unknown_tandem_log_says_so_once_and_runs():
    p = _run("import sys; from tandem.cli import main; sys.exit(main(['-v', 'report', '/nonexistent']))",
             TANDEM_LOG="loud")
    assert p.returncode == 2  # the report's own error: the run went on
    assert p.stderr.count("TANDEM_LOG='loud'") == 1
    assert "Traceback" not in p.stderr


def test_no_leaked_shared_memory_warning_at_exit():
    """A shared-memory segment left to the resource tracker (as vLLM's workers leave theirs): the
    tracker removes it at exit and, unless tandem is imported, warns about it."""
    code = ("{imp}from multiprocessing import shared_memory\n"
            "s = shared_memory.SharedMemory(create=True, size=64)\n")
    bare = _run(code.format(imp=""))
    assert "leaked shared_memory" in bare.stderr  # the check can fail
    quiet = _run(code.format(imp="import tandem\n"))
    assert quiet.returncode == 0
    assert quiet.stderr == ""


def test_bm25s_debug_lines_are_hidden(caplog):
    pytest.importorskip("bm25s")
    import logging

    from tandem.tasks.retrieval import BM25Retriever, Passage

    caplog.set_level(logging.DEBUG)
    BM25Retriever([Passage(title="a", text="the iris flower"), Passage(title="b", text="a rose garden")])
    assert not [r for r in caplog.records if r.name.startswith("bm25s")]
