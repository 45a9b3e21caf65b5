"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

from tandem.settings import settings


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """No global LM and no shared call cache leak between tests."""
    monkeypatch.setenv("TANDEM_CACHE", "0")
    settings.reset()
    yield
    settings.reset()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A small randomly initialised Llama with SmolLM2's tokenizer and chat template."""
    from tandem.lm.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm_vllm():
    """The real embedded model on the in-process vLLM engine, shared by the slow tests."""
    pytest.importorskip("vllm")
    from tandem.lm.vllm import VLLM, shutdown_engines

    lm = VLLM("smollm2-135m")
    lm.start()
    yield lm
    shutdown_engines()


def _ci() -> bool:
    """CI=true: a test that would skip (no engine, model or shared data) fails instead."""
    return os.environ.get("CI", "").lower() == "true"


def _as_failure(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped:
        _as_failure(report)


@pytest.fixture
def no_lm(monkeypatch):
    """``get_lm`` fails the test: checks and errors must come before any model is built."""
    import tandem.lm.registry as registry

    def refuse(spec, **options):
        raise AssertionError(f"an LM was built ({spec}) before the input was checked")

    monkeypatch.setattr(registry, "get_lm", refuse)


def pytest_collection_modifyitems(config, items):
    """Test modules that set ``RUN_LAST = True`` (they stop the shared engine, which
    costs the tests after them a ~60 s restart on this CPU) run after all others."""
    items.sort(key=lambda item: bool(getattr(item.module, "RUN_LAST", False)))
