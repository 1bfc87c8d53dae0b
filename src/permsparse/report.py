"""Reports: a Markdown page with the numbers and PNG plots a person would rather look at.

* ``training.png``: loss, temperature, permutation entropy and share of channels moved
  per step of the learned run;
* ``retained.png``: retained score per site, plain N:M vs with the permutation, against
  the unstructured ceiling.

The plots need matplotlib (``permsparse[plots]``); without it the page is written
without them, with one warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from permsparse._optional import MissingExtra, require
from permsparse.io.atomic import atomic_file, atomic_write_text
from permsparse.models.apply import SiteReport
from permsparse.train.state import StepLog

__all__ = ["markdown_table", "pyplot", "plot_training", "plot_retained", "write_report"]

log = logging.getLogger(__name__)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table of flat records."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))

    def fmt(v) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; :class:`MissingExtra` without matplotlib."""
    require("matplotlib", "plots", "plotting").use("Agg")
    return require("matplotlib.pyplot", "plots", "plotting")


def _save(fig, path: Path) -> None:
    """Atomic PNG write."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_training(history: Sequence[StepLog], path: "str | Path") -> Path | None:
    """Loss (and CE / KL), τ, entropy and moved channels per step."""
    if not history:
        return None
    plt = pyplot()
    # Block by block, each block counts its own steps from 0: the records in order, one block after another.
    blockwise = any(b.step <= a.step for a, b in zip(history, history[1:]))
    steps = list(range(len(history))) if blockwise else [h.step for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    ax = axes[0, 0]
    ax.plot(steps, [h.loss for h in history], label="loss")
    if any(h.ce == h.ce for h in history):
        ax.plot(steps, [h.ce for h in history], label="CE", alpha=0.7)
        ax.plot(steps, [h.kl for h in history], label="KL", alpha=0.7)
    ax.set_title("calibration loss")
    ax.legend()
    axes[0, 1].semilogy(steps, [h.tau for h in history])
    axes[0, 1].set_title("temperature τ")
    axes[1, 0].plot(steps, [h.entropy for h in history])
    axes[1, 0].set_title("mean permutation entropy (0 hard, 1 uniform)")
    axes[1, 0].set_ylim(0, 1.05)
    axes[1, 1].plot(steps, [100 * h.changed for h in history])
    axes[1, 1].set_title("channels whose hard position changed (%)")
    for a in axes.flat:
        a.set_xlabel("step (the blocks one after another)" if blockwise else "step")
        a.grid(alpha=0.3)
    return _finish(fig, path)


def _finish(fig, path: "str | Path") -> Path:
    """Lay out, save (atomically) and close ``fig``."""
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    pyplot().close(fig)
    return path


def plot_retained(reports: Sequence[SiteReport], path: "str | Path") -> Path | None:
    """Retained score per site: plain N:M, with the permutation, unstructured ceiling."""
    ok = [r for r in reports if r.retained == r.retained]
    if not ok:
        return None
    plt = pyplot()
    x = list(range(len(ok)))
    fig, ax = plt.subplots(figsize=(max(8, len(ok) * 0.09), 4))
    ax.plot(x, [100 * r.retained_ceiling for r in ok], "k--", lw=1, label="unstructured ceiling")
    ax.plot(x, [100 * r.retained for r in ok], "o-", ms=2.5, label="with permutation")
    ax.plot(x, [100 * r.retained_plain for r in ok], "s-", ms=2.5, alpha=0.7, label="plain N:M")
    ax.set_xlabel("site (forward order)")
    ax.set_ylabel("retained score (%)")
    ax.set_title("score kept by the mask, per site")
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def write_report(
    out_dir: "str | Path",
    title: str,
    summary_rows: Sequence[Mapping],
    config: Mapping,
    reports: Sequence[SiteReport] = (),
    history: Sequence[StepLog] = (),
    guard: Mapping[str, float] | None = None,
    kept_plan: str | None = None,
) -> Path:
    """``report.md`` plus ``training.png`` and ``retained.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        train_png = plot_training(history, out / "training.png")
        ret_png = plot_retained(reports, out / "retained.png")
    except MissingExtra as err:
        log.warning("the report has no plots: %s", err)
        train_png = ret_png = None
    parts = [f"# {title}\n", markdown_table(summary_rows)]
    if kept_plan:
        parts.append(f"\nThe guard kept: **{kept_plan}**.\n")
    if guard:
        parts.append("\nCalibration loss of each candidate plan (lower is better)"
                     + ("; `+refit`: the finalists with their kept weights refitted, as the model has them, "
                        "which decides" if any(k.endswith("+refit") for k in guard) else "") + ":\n\n")
        parts.append(markdown_table([{"plan": k, "calibration_loss": v} for k, v in guard.items()]))
    if train_png:
        parts.append("\n## Training\n\n![training curves](training.png)\n")
    ok = [r for r in reports if r.retained == r.retained]
    if ok:
        mean = lambda f: sum(f(r) for r in ok) / len(ok)  # noqa: E731
        parts.append(
            "\n## Retained score\n\n"
            f"Mean over {len(ok)} sites: plain N:M {100 * mean(lambda r: r.retained_plain):.2f}%, "
            f"with permutation {100 * mean(lambda r: r.retained):.2f}%, "
            f"unstructured ceiling {100 * mean(lambda r: r.retained_ceiling):.2f}%.\n"
            + ("\n![retained](retained.png)\n" if ret_png else "")
        )
    parts.append("\n## Configuration\n\n```\n" + "\n".join(f"{k}: {v}" for k, v in config.items()) + "\n```\n")
    return atomic_write_text(out / "report.md", "".join(parts))
