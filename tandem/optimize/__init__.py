"""Optimizers: the prompt step, the weight steps (SFT ``w``, RL ``r``), and their alternation."""

from tandem.optimize.base import CompileResult, Optimizer, StepRecord
from tandem.optimize.better_together import BetterTogether, SplitPlan, StrategyError, parse_strategy
from tandem.optimize.bootstrap import BootstrapFewShot, bootstrap
from tandem.optimize.finetune import BootstrapFinetune
from tandem.optimize.grpo import GRPO, GRPOSettings
from tandem.optimize.random_search import RandomSearch

__all__ = [
    "BetterTogether", "BootstrapFewShot", "BootstrapFinetune", "CompileResult", "GRPO", "GRPOSettings", "Optimizer",
    "RandomSearch",
    "SplitPlan", "StepRecord", "StrategyError", "bootstrap", "parse_strategy",
]
