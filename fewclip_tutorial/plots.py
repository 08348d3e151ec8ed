"""Figures shared by the chapters (seaborn on top of matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def accuracy_vs_shots(
    frame,
    metric: str = "test_accuracy",
    ax=None,
    title: str | None = None,
    order: Sequence[str] | None = None,
):
    """Line plot of ``metric`` against shots (log2 axis), mean ± sd over seeds per label.

    Args:
        frame: the output of :func:`fewclip_tutorial.sweep.run_sweep`.
        metric: a column, e.g. ``"test_accuracy"`` or ``"ood_mean"``.
        ax: matplotlib axes (a new figure when ``None``).
        order: legend order of the labels.

    Returns:
        The axes.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(
        data=frame,
        x="shots",
        y=metric,
        hue="label",
        hue_order=order,
        marker="o",
        errorbar="sd",
        ax=ax,
    )
    ax.set_xscale("log", base=2)
    shots = sorted(frame["shots"].unique())
    ax.set_xticks(shots)
    ax.set_xticklabels([str(s) for s in shots])
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel(metric.replace("_", " ") + " (%)")
    if title:
        ax.set_title(title)
    ax.legend(title=None, fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def image_grid(
    split, classnames: Sequence[str], per_class: int = 1, max_classes: int = 12, ax=None
):
    """Show the first ``per_class`` images of each class of a ``LabeledSplit``.

    Returns:
        The axes (one image per column, classes titled).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    labels = np.asarray(split.labels)
    classes = list(range(min(len(classnames), max_classes)))
    picks = [np.flatnonzero(labels == c)[:per_class] for c in classes]
    fig, axes = plt.subplots(
        per_class, len(classes), figsize=(1.1 * len(classes), 1.25 * per_class), squeeze=False
    )
    for j, (c, idx) in enumerate(zip(classes, picks)):
        for i in range(per_class):
            a = axes[i][j]
            a.axis("off")
            if i < len(idx):
                a.imshow(split.load_image(int(idx[i])), interpolation="nearest")
            if i == 0:
                a.set_title(classnames[c], fontsize=7)
    fig.tight_layout()
    return axes


def repository_root() -> Path | None:
    """The repository checkout this package runs from, or ``None`` for an installed copy.

    A checkout is recognised by ``pyproject.toml`` and ``book/`` beside the package; on
    Colab (package installed from git into site-packages) there is none.
    """
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "book").is_dir() else None


#: Set to ``1`` (``make notebooks`` does) to let a chapter refresh the README's figure.
WRITE_README_FIGURE_ENV = "FEWCLIP_WRITE_README_FIGURE"


def save_readme_figure(fig, name: str = "readme_result.png", dpi: int = 110) -> Path | None:
    """Save ``fig`` as the README's figure, ``book/figures/<name>``, only when asked.

    Writes only inside a repository checkout and only when the environment variable
    ``FEWCLIP_WRITE_README_FIGURE`` is ``1`` (``make notebooks``, which re-executes the
    chapters for a commit, sets it). Running a chapter, ``make book`` and ``make test``
    leave the checkout unmodified. Returns the path written, or ``None``.
    """
    root = repository_root()
    if root is None or os.environ.get(WRITE_README_FIGURE_ENV) != "1":
        return None
    path = root / "book" / "figures" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
