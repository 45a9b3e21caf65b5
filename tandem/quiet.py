"""What the libraries under tandem print: quiet by default, louder on request.

vLLM, transformers, torch, huggingface_hub and bm25s log INFO and WARNING
lines, emit Python warnings (FutureWarning, UserWarning) and C++ warnings
(torch's ``[W ... utils.cpp]`` lines), in tandem's process and in the
engine's worker processes. ``configure()`` runs when ``tandem`` is imported,
before any of them is, so their loggers, their environment settings and the
warning filters take effect in this process and in every child process:

- **quiet** (the default, ``TANDEM_LOG`` unset): the libraries' errors are
  shown; their INFO and WARNING lines, their Python warnings and torch's C++
  warnings are not. tandem's own logger follows the program's logging setup
  (Python's default, and the ``tandem`` command, show its warnings).
- ``TANDEM_LOG=debug|info|warning|error``: every logger, tandem's and the
  libraries', at that level, and the libraries' Python warnings shown
  (Python's own filters apply). ``tandem -v`` is ``TANDEM_LOG=info``.

Environment settings that the user has set are never changed: a
``VLLM_LOGGING_LEVEL=INFO`` in the environment wins over quiet.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["ENV", "LEVELS", "LIBRARIES", "configure", "for_command", "level", "progress_bars", "quiet_library"]

#: The environment variable that chooses how much is printed.
ENV = "TANDEM_LOG"
#: Its accepted values (case does not matter).
LEVELS = ("debug", "info", "warning", "error")
#: Loggers (and warning-emitting packages) of the libraries tandem runs.
LIBRARIES = (
    "vllm", "transformers", "torch", "huggingface_hub", "tokenizers", "safetensors", "peft", "trl",
    "accelerate", "datasets", "bm25s", "httpx", "httpcore", "urllib3", "filelock", "numexpr", "triton",
    "multiprocessing",
)
#: Python warnings attributed to these modules are hidden when quiet: the
#: libraries', and tandem's own calls into them (a deprecated argument).
_WARNING_MODULES = r"(%s|tandem)(\.|$)" % "|".join(LIBRARIES)
#: The resource tracker process (a plain ``python -c``) imports nothing of
#: tandem, so only ``PYTHONWARNINGS`` reaches it; at exit it reports the
#: shared-memory segments it removes for vLLM's workers.
_TRACKER_FILTER = "ignore::UserWarning:multiprocessing.resource_tracker"

#: Environment values ``configure`` set (not the user): only these it changes again.
_ours: dict[str, str] = {}
_current: str | None = None


def level() -> str | None:
    """The level ``TANDEM_LOG`` asks for, or None (quiet). An unknown value is an error naming it."""
    raw = os.environ.get(ENV, "").strip().lower()
    if not raw or raw == "quiet":
        return None
    if raw not in LEVELS:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(LEVELS)} (or unset: quiet)")
    return raw


def _env_defaults(lvl: str | None) -> dict[str, str]:
    """Environment settings read by the libraries (and their child processes) for level ``lvl``."""
    lib = (lvl or "error").upper()
    return {
        "VLLM_LOGGING_LEVEL": lib,
        "TRANSFORMERS_VERBOSITY": lib.lower(),
        "HF_HUB_VERBOSITY": lib.lower(),
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "" if lvl else "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "" if lvl else "1",
        "TORCH_CPP_LOG_LEVEL": "ERROR" if lvl in (None, "error") else "WARNING" if lvl == "warning" else "INFO",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # vLLM logs to stdout by default, among the results
    }


def _set_env(name: str, value: str) -> None:
    """Set ``name`` unless the user set it; an empty value removes what tandem set."""
    if name in os.environ and _ours.get(name) != os.environ[name]:
        return  # the user's
    if value:
        os.environ[name] = _ours[name] = value
    else:
        os.environ.pop(name, None)
        _ours.pop(name, None)


def _tracker_warnings(quiet: bool) -> None:
    """Add (quiet) or remove the resource tracker's filter in ``PYTHONWARNINGS``, keeping the user's."""
    parts = [p for p in os.environ.get("PYTHONWARNINGS", "").split(",") if p and p != _TRACKER_FILTER]
    if quiet:
        parts.append(_TRACKER_FILTER)
    if parts:
        os.environ["PYTHONWARNINGS"] = ",".join(parts)
    else:
        os.environ.pop("PYTHONWARNINGS", None)


def quiet_library(name: str) -> None:
    """Set library logger ``name`` to the current level again: for a library that sets its own
    logger's level when imported (bm25s sets DEBUG)."""
    logging.getLogger(name).setLevel(_library_level(_current))


def _library_level(lvl: str | None) -> int:
    return logging.ERROR if lvl is None else getattr(logging, lvl.upper())


def configure(lvl: str | None = None) -> str | None:
    """Apply level ``lvl`` (``debug``/``info``/``warning``/``error``; None: quiet); ``TANDEM_LOG``,
    when set, wins. Returns the level applied. An unknown ``TANDEM_LOG`` applies ``lvl``, then
    raises ValueError naming it."""
    if lvl is not None and lvl not in LEVELS:
        raise ValueError(f"log level {lvl!r}: expected one of {', '.join(LEVELS)}")
    try:
        chosen = level() or lvl
    except ValueError:
        _apply(lvl)
        raise
    _apply(chosen)
    return chosen


def _apply(lvl: str | None) -> None:
    global _current
    _current = lvl
    for name, value in _env_defaults(lvl).items():
        _set_env(name, value)
    _tracker_warnings(lvl is None)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(_library_level(lvl))
    # Quiet leaves tandem's own logger to the program's logging setup (the command shows WARNING).
    logging.getLogger("tandem").setLevel(logging.NOTSET if lvl is None else getattr(logging, lvl.upper()))
    # The newest filter comes first and wins over the one an earlier call added.
    warnings.filterwarnings("ignore" if lvl is None else "default", module=_WARNING_MODULES)
    try:  # transformers caches its verbosity when imported: tell it directly
        tf_logging = sys.modules.get("transformers.utils.logging")
        if tf_logging is not None:
            tf_logging.set_verbosity(_library_level(lvl))
    except Exception:  # noqa: BLE001 - a transformers without this API keeps its own setting
        pass



def progress_bars() -> bool:
    """Whether the libraries' own progress bars (vLLM's weight loading) should show: at ``info``
    and ``debug``."""
    return _current in ("info", "debug")


def for_command(verbose: bool) -> int:
    """The ``tandem`` command's setting: quiet unless ``-v`` (``info``; ``TANDEM_LOG`` wins), and
    ``TQDM_DISABLE`` when quiet (the command draws its own progress). Returns the level for
    tandem's own log lines."""
    try:
        chosen = configure("info" if verbose else None)
    except ValueError:  # an unknown TANDEM_LOG: said once when tandem was imported
        chosen = "info" if verbose else None
    if chosen is None:
        os.environ.setdefault("TQDM_DISABLE", "1")
    return logging.WARNING if chosen is None else getattr(logging, chosen.upper())
