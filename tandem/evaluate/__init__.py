"""Concurrent evaluation and metrics."""

from tandem.evaluate.evaluate import EvalResult, MetricError, Record, call_metric, evaluate, run_example

__all__ = ["EvalResult", "MetricError", "Record", "call_metric", "evaluate", "run_example"]
