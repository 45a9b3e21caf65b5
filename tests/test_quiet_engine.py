"""Quiet and clean with the real engine (slow, in CI): ``tandem eval`` and a library script print
no library noise, and Ctrl-C or SIGTERM while the model loads prints one line, exits 130 / 143
and leaves no engine process behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
psutil = pytest.importorskip("psutil")

#: What the libraries print when tandem does not quiet them.
NOISE = ("Triton", "NUMA", "FutureWarning", "UserWarning", "DeprecationWarning", "Attempted to load weight",
         "resource_tracker", "leaked", "force killing", "INFO ", "WARNING ", "ERROR ", "Traceback", "[W",
         "Loading safetensors")


def _env() -> dict:
    drop = ("TANDEM_LOG", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM", "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL",
            "PYTHONWARNINGS")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"TANDEM_CACHE": "0"}


def _tandem(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "tandem"
    return ([str(script)] if script.exists() else [sys.executable, "-m", "tandem.cli"]) + list(args)


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


@pytest.fixture(scope="module")
def engine_available():
    pytest.importorskip("vllm")
    from tandem.lm.models import ensure_model

    ensure_model("smollm2-135m")


def test_eval_prints_no_library_noise(engine_available):
    p = subprocess.run(_tandem("eval", "iris", "--limit", "5", "--no-cache"), capture_output=True, text=True,
                       env=_env(), timeout=900)
    assert p.returncode == 0, p.stderr
    assert "score" in p.stdout
    assert "model ready in" in p.stderr
    assert not _noise(p.stdout + p.stderr), p.stderr


LIBRARY = textwrap.dedent("""
    import sys
    import tandem
    from tandem.evaluate import evaluate
    from tandem.tasks.iris import iris_metric, load_iris, split_iris

    class Iris(tandem.Module):
        def __init__(self):
            self.classify = tandem.Predict("sepal_length, sepal_width, petal_length, petal_width -> species")

        def forward(self, **x):
            return self.classify(**x)

    if __name__ == "__main__":
        data = split_iris(load_iris(), seed=0)["dev"][:4]
        for checkpoint in sys.argv[1:]:  # the second one's weights are loaded into the running engine
            lm = tandem.get_lm(checkpoint, cache=False)
            print("score", evaluate(Iris().set_lm(lm), data, iris_metric).score, flush=True)
        # no lm.close(): the engine is shut down at exit
""")


def test_library_use_prints_no_library_noise(engine_available, tmp_path):
    """README-style use: float32 weights loaded into the running bf16 engine (as a weight step
    does) and no ``lm.close()``; only the script's own lines come out."""
    from safetensors.torch import load_file, save_file

    from tandem.lm.models import ensure_model

    src = ensure_model("smollm2-135m")
    fp32 = tmp_path / "fp32"  # another checkpoint of the same architecture, in float32
    fp32.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "tandem.json"):
            shutil.copy(f, fp32 / f.name)
    weights = {k: v.float() for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, fp32 / "model.safetensors", metadata={"format": "pt"})
    script = tmp_path / "use.py"
    script.write_text(LIBRARY)
    p = subprocess.run([sys.executable, str(script), "smollm2-135m", str(fp32)], capture_output=True,
                       text=True, env=_env(), timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [line.split()[0] for line in p.stdout.splitlines()] == ["score", "score"], p.stdout + p.stderr
    assert not _noise(p.stdout + p.stderr), p.stdout + p.stderr


def _engine_processes(pid: int) -> list:
    """The engine core and worker processes under ``pid``: every descendant but multiprocessing's
    resource tracker (vLLM renames its processes, ``VLLM::EngineCore``, so they are not found by name)."""
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" not in cmd:
            out.append(child)
    return out


@pytest.mark.parametrize("sig, group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_signal_during_model_load(engine_available, sig, group, code):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM (to tandem)
    once the engine's worker is loading the model."""
    p = subprocess.Popen(_tandem("eval", "iris", "--limit", "5", "--no-cache"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(_engine_processes(p.pid)) < 2:  # the engine core and its worker
            assert p.poll() is None and time.monotonic() < deadline, "the engine's processes never started"
            time.sleep(0.2)
        time.sleep(2)
        everyone = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        t0 = time.monotonic()
        if group:
            os.killpg(p.pid, sig)
        else:
            os.kill(p.pid, sig)
        out, err = p.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert "model ready" not in err, "the signal came after the model had loaded"
    assert p.returncode == code, err
    lines = err.strip().splitlines()
    assert lines[-1] == "interrupted", err
    assert len(lines) == 2, err  # the command's first line, then this one
    assert not _noise(out + err), err
    _, alive = psutil.wait_procs(everyone, timeout=15)
    assert not alive, f"still running {took + 15:.0f} s after the signal: {[q.cmdline() for q in alive]}"
