"""The one explicit settings object: where tandem keeps files, the default LM.

Nothing else in the package is global. Tests reset it with ``settings.reset()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.lm.base import LM


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
