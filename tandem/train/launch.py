"""Start the LoRA trainer in several processes with torchrun, from the process that needs the adapter.

``train_lora`` calls ``launch`` when ``LoRAConfig.processes`` is above 1
(``[lora] processes = 2`` in a run config): the SFT examples go to a JSONL
file, ``torchrun --standalone --nproc_per_node=N -m tandem.train.distributed``
runs the data-parallel trainer on this machine (a free port on localhost),
rank 0's ``step N/TOTAL loss X`` lines are passed on to ``progress``, and the
run's summary is read back from the adapter's ``tandem_adapter.json``.

torchrun ships with torch and needs no configuration file; it is started as
``python -m torch.distributed.run`` with this interpreter, so it runs in the
same environment. On CPU each process gets ``threads // N`` intra-op threads
(``OMP_NUM_THREADS``, unless it is set already), so N processes share the
cores one process would have used.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from tandem.train.adapter import load_adapter_meta
from tandem.train.sft import SFTExample

#: The line rank 0 prints after every optimizer step (``tandem.train.distributed``).
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+)$")
#: The package folder's parent, put on the processes' PYTHONPATH so they import this tandem.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


class LaunchFailed(RuntimeError):
    """The training processes did not finish; the message ends with the last lines they printed."""


def write_sft(path: Path, examples: Sequence[SFTExample]) -> None:
    """The examples as JSONL (``prompt``, ``completion``, ``module``), the format ``--data`` reads."""
    with open(path, "w") as fh:
        for ex in examples:
            fh.write(json.dumps({"module": ex.module, "prompt": ex.prompt, "completion": ex.completion}) + "\n")


def torchrun_command(processes: int, args: Sequence[str]) -> list[str]:
    """The torchrun command line that starts ``processes`` trainers on this machine with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "tandem.train.distributed", *args]


def child_env(processes: int) -> dict[str, str]:
    """The environment of the training processes: this tandem importable, the CPU threads shared out."""
    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // processes)))
    return env


def launch(model_dir: Path, examples: Sequence[SFTExample], config, out_dir: Path,
           progress: Callable[[int, int, float], None] | None = None, *, overwrite: bool = False) -> dict:
    """Train ``examples`` in ``config.processes`` processes; returns the training summary rank 0 saved.

    ``config`` is a LoRAConfig. Raises LaunchFailed (with the processes' last
    output lines) when torchrun exits with an error.
    """
    out_dir = Path(out_dir)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with tempfile.TemporaryDirectory(prefix="tandem-sft-") as tmp:
        data = Path(tmp) / "sft.jsonl"
        write_sft(data, examples)
        args = ["--model", str(model_dir), "--data", str(data), "--out", str(out_dir),
                "--lora", json.dumps(config.to_dict())] + (["--overwrite"] if overwrite else [])
        proc = subprocess.Popen(torchrun_command(config.processes, args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=child_env(config.processes))
        with proc:
            try:
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    step = STEP_LINE.match(line)
                    if step and progress is not None:
                        progress(int(step[1]), int(step[2]), float(step[3]))
                    elif not step:
                        tail.append(line)
            except BaseException:  # interrupted here: torchrun passes the SIGTERM on to its trainers
                proc.terminate()
                raise
        if proc.returncode:
            shown = "\n".join(tail)
            raise LaunchFailed(f"LoRA training in {config.processes} processes (torchrun) failed with exit code "
                               f"{proc.returncode}; its last lines:\n{shown}")
    return load_adapter_meta(out_dir)["training"]
