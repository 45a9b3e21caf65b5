"""The one explicit settings object (the default LM), where tandem keeps files, and the list of
everything else that lives for the whole process.

``settings.lm`` is the LM of predictors that have none of their own; tests
reset it with ``settings.reset()``. ``tandem_home()`` reads ``TANDEM_HOME``
at each call.

Other process-wide state, each named here (tests/test_layers.py fails on a
module-level object that holds state and is not in this list):

- ``tandem.lm.cache._default``: the default call cache, one SQLite file under
  ``tandem_home()`` (``default_cache()``; ``TANDEM_CACHE=0``, read at each
  call, turns it off).
- ``tandem.lm.registry._BACKENDS``: the backends by name, built in, added with
  ``register_backend``, and loaded from entry points (group "tandem.backends").
- ``tandem.lm.vllm_pool.pool``: the running vLLM engines, one per checkpoint
  and options, shared by every ``VLLM`` object that points at it, with the
  groups that own each; what each engine this process started did
  (``engine_stats()``); the flag that SIGTERM's ``abort()`` sets.
- ``tandem.lm.hf_checkpoint._checkpoints``: transformers checkpoints (tokenizer,
  and the model once loaded), one per folder and dtype, kept while an ``HFLM``
  uses it.
- ``tandem.serve_http._PROTOCOLS``: uvicorn's HTTP protocol classes with
  JSON error replies, made once per protocol.
- ``tandem.experiments.table._OUTCOMES``: per-example test scores read from
  results files, by path, modification time and size.
- ``tandem.tasks.registry._FACTORIES``: the tasks by name, built in, added
  with ``register_task``, and loaded from entry points (group "tandem.tasks");
  ``tandem.tasks.retrieval._STOPWORDS``: bm25s's English stop words, loaded
  on first use.
- ``tandem.cli_output.console``: the console the CLI writes its messages to.
- ``tandem.quiet``: ``configure()`` runs when ``tandem`` is imported and sets
  the libraries' loggers, the warning filters and the libraries' environment
  variables for the level that ``TANDEM_LOG`` asks for;
  ``tandem.quiet._ours`` holds the environment values it set and
  ``tandem.quiet._current`` the level it set them for.

Read from the environment when used, not at import: ``TANDEM_HOME``,
``TANDEM_CACHE``, ``TANDEM_DATA`` (where task data is looked for),
``OPENAI_API_KEY``, and for the vLLM engines ``TANDEM_MAX_ENGINES``,
``TANDEM_RELOAD_WEIGHTS``, ``TANDEM_ENGINE_START_TIMEOUT`` and
``TANDEM_MAX_MERGED`` (merged checkpoints kept under ``TANDEM_HOME/merged``). The CLI and
the vLLM backend set defaults for the libraries' own variables
(``VLLM_LOGGING_LEVEL`` and the like) with ``os.environ.setdefault``, so a
value the user set wins. Context variables
(the active trace, module calls, sampling and hint overrides) belong to one
thread or context, not to the process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.lm.protocol import LM


def tandem_home() -> Path:
    """Cache directory: converted checkpoints, call cache. ``TANDEM_HOME`` overrides."""
    return Path(os.environ.get("TANDEM_HOME", Path.home() / ".cache" / "tandem"))


@dataclass
class Settings:
    lm: "LM | None" = None  # used by predictors that have no LM of their own

    def configure(self, *, lm: "LM | None" = None) -> None:
        self.lm = lm

    def reset(self) -> None:
        self.lm = None


settings = Settings()
