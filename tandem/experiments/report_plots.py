"""The report's plots: matplotlib figures as base64 PNGs, so the HTML needs no other file.

Each function takes plain numbers (what ``report.py`` read from the run
directory) and returns ``{"alt": ..., "data": <base64 PNG>}`` for the
templates' ``image`` macro, or None when there is nothing to draw.
"""

from __future__ import annotations

import base64
import io


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("tandem report draws its plots with matplotlib: pip install 'tandem[report]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig, alt: str) -> dict:
    """The figure as an image for the templates (and closed)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"alt": alt, "data": base64.b64encode(buf.getvalue()).decode("ascii")}


def run_scores(xs: list[int], labels: list[str], dev: list, inner: list, zero_shot_test: float | None,
               returned: tuple[int, float] | None) -> dict:
    """One run: the dev score after each step, the step's own selection score, zero-shot and returned test."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot(xs, [float("nan") if v is None else v for v in dev], "o-", label="dev (validation) after the step")
    if any(v is not None for v in inner):
        ax.plot(xs, [float("nan") if v is None else v for v in inner], "s--", alpha=0.7,
                label="the step's own selection score")
    if zero_shot_test is not None:
        ax.axhline(zero_shot_test, color="grey", ls=":", label="zero-shot, test")
    if returned is not None:
        ax.plot([returned[0]], [returned[1]], "*", ms=14, color="C3", label="returned program, test")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("score %")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return png(fig, "scores after each step")


def run_costs(labels: list[str], seconds: list[float], tokens: list[int]) -> dict:
    """One run: wall time and tokens of each step, as bars."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.bar(labels, seconds, color="C0")
    a1.set_title("wall time per step, s", fontsize=10)
    a2.bar(labels, tokens, color="C1")
    a2.set_title("tokens per step (prompt + output)", fontsize=10)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=8)
    return png(fig, "time and tokens per step")


def loss_curves(curves: list[tuple[str, list[float]]]) -> dict | None:
    """The LoRA training loss of each trained adapter (label, loss per optimizer step)."""
    curves = [(label, losses) for label, losses in curves if losses]
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for label, losses in curves:
        ax.plot(range(1, len(losses) + 1), losses, "o-" if len(losses) < 30 else "-", ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean completion loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return png(fig, "LoRA training loss")


def reward_curves(curves: list[tuple[str, list[float], list[float], list[float]]]) -> dict | None:
    """Each RL step's reward curve (label, mean reward, its std, share of equal-reward groups per RL step):
    the mean with a band of one std, and the share of groups that taught nothing as bars below."""
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7.5, 4.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 0.8 / len(curves)
    for k, (label, means, stds, zero) in enumerate(curves):
        xs = list(range(1, len(means) + 1))
        line = ax.plot(xs, means, "o-" if len(means) < 30 else "-", ms=3, label=label)[0]
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.15)
        bx.bar([x - 0.4 + width * (k + 0.5) for x in xs], zero, width=width, color=line.get_color(), alpha=0.6)
    ax.set_ylabel("mean reward (± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    bx.set_ylabel("share of\nequal-reward\ngroups", fontsize=7)
    bx.set_ylim(0, 1)
    bx.set_xlabel("RL step")
    bx.grid(alpha=0.3)
    return png(fig, "RL reward curve")
