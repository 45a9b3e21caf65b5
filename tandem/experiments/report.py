"""``tandem report RUN_DIR``: one self-contained HTML file, and a markdown summary next to it.

    html_path, markdown = write_report("runs/exp-iris")     # an experiment's out folder
    html_path, markdown = write_report("runs/iris-pwp-s0")  # one run directory

Both files are written (``report.html`` and ``report.md`` in the directory, or
``--out FILE.html`` and ``FILE.md``). The HTML has no external assets (plots
are base64 PNGs, ``report_plots.py``; styles inline), so it can be mailed as
it is. It is rendered from the Jinja templates in ``templates/`` with
autoescaping on, so text from a run (examples, predictions, instructions)
is shown, never interpreted. This module reads a run directory into plain
data for the templates (``report_run.py``); ``report_experiment.py`` does the same for an
experiment. A run's report holds:

- a summary (scores, fixed / broken, failures on test) and the time: model
  load, the steps, the test evaluations, and the total the CLI printed;
- the settings (``config.json``);
- the dev score after each step; time, tokens and failure kinds per step;
- each prompt step's candidates with their scores (the chosen one marked);
- each weight step's LoRA training loss curve (the whole curve from the
  adapter's ``tandem_adapter.json``; history.json keeps its last five);
- each RL step's reward curve: per RL step the mean reward with its spread,
  the groups whose rewards were all equal (they teach nothing), failures,
  loss, time per phase and tokens, plotted and as a table;
- the returned program's instructions and demos (``final/program.json``);
- test examples the optimization fixed and broke: the zero-shot program's
  records (``baseline_records.json``) against the returned program's
  (``test_records.json``).
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from tandem.experiments.report_experiment import experiment_context
from tandem.experiments.report_run import failures_text, fmt, run_context
from tandem.experiments.run import RESULTS, read_json

ENV = Environment(
    loader=PackageLoader("tandem.experiments", "templates"),
    autoescape=lambda name: not (name or "").endswith(".md.j2"),  # HTML escaped; markdown as it is
    undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
)
ENV.filters.update(fmt=fmt, failures=failures_text)


# -- entry point ------------------------------------------------------------------------------
def write_report(path: str | Path, out: str | Path | None = None, max_examples: int = 8) -> tuple[Path, str]:
    """Write the HTML report and the markdown summary of a run or experiment; return (HTML path, markdown)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    doc = read_json(path / RESULTS)
    if isinstance(doc, dict) and "cells" in doc:
        ctx, name = experiment_context(path, max_examples), "experiment"
    elif doc is not None or (path / "history.json").exists() or (path / "plan.json").exists():
        ctx, name = run_context(path, max_examples, plots=True), "run"
    else:
        raise ValueError(f"{path} is neither a run directory (results.json, history.json) nor an experiment's "
                         "out folder (results.json with cells)")
    target = Path(out) if out else path / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(ENV.get_template(f"{name}.html.j2").render(ctx), encoding="utf-8")
    md = ENV.get_template(f"{name}.md.j2").render(ctx)
    target.with_suffix(".md").write_text(md, encoding="utf-8")
    return target, md
