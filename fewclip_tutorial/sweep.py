"""Run methods over shots and seeds and collect the results in a table.

Every chapter's "accuracy against shots" figure comes from :func:`run_sweep`: one
:class:`~fewclip_tutorial.experiment.Context` per ``(shots, seed)`` episode, shared
by all methods so they see the same few-shot images and the same cached features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fewclip_tutorial.experiment import build_context, run_method

#: ``label -> (method name, options)``; a bare method name means default options.
MethodTable = Mapping[str, str | tuple[str, Mapping[str, Any]]]


def _normalise(methods: MethodTable | Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    if not isinstance(methods, Mapping):
        methods = {m: m for m in methods}
    out = {}
    for label, spec in methods.items():
        if isinstance(spec, str):
            out[label] = (spec, {})
        else:
            name, opts = spec
            out[label] = (name, dict(opts))
    return out


def flatten_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: nested ``ood_accuracy`` becomes ``ood:<domain>`` columns plus ``ood_mean``."""
    row = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    ood = result.get("ood_accuracy") or {}
    for d, acc in ood.items():
        row[f"ood:{d}"] = acc
    if ood:
        row["ood_mean"] = sum(ood.values()) / len(ood)
    return row


def run_sweep(
    methods: MethodTable | Sequence[str],
    *,
    dataset: str = "shapeworld",
    backbone: str = "shapeworld-tiny",
    pretrained: str | None = "default",
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    progress: bool = False,
    dataset_kwargs: Mapping[str, Any] | None = None,
    keep_results: bool = False,
):
    """Run every method on every ``(shots, seed)`` episode.

    Args:
        methods: ``{"label": "method"}`` or ``{"label": ("method", {options})}``, or a
            list of method names.
        dataset, backbone, pretrained, dataset_kwargs: the episode's data and model.
        shots, seeds: the grid.
        keep_results: also return the raw result dicts (for method-specific keys).

    Returns:
        A ``pandas.DataFrame`` with one row per (label, shots, seed): ``label``,
        ``method``, ``shots``, ``seed``, ``val_accuracy``, ``test_accuracy``,
        ``ood:<domain>`` and ``ood_mean`` columns (percent), plus scalar extras.
        With ``keep_results``, a ``(frame, list_of_dicts)`` pair.
    """
    import pandas as pd

    table = _normalise(methods)
    rows, raw = [], []
    for k in shots:
        for seed in seeds:
            ctx = build_context(
                dataset,
                backbone,
                int(k),
                int(seed),
                pretrained=pretrained,
                progress=progress,
                **dict(dataset_kwargs or {}),
            )
            for label, (name, opts) in table.items():
                res = run_method(name, context=ctx, progress=progress, **opts)
                res["label"] = label
                raw.append(res)
                rows.append({"dataset": str(dataset), **flatten_result(res)})
    frame = pd.DataFrame(rows)
    first = ["label", "method", "dataset", "shots", "seed", "val_accuracy", "test_accuracy"]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    return (frame, raw) if keep_results else frame


def summarise(frame, metric: str = "test_accuracy", ndigits: int = 1):
    """Mean and standard deviation over seeds: rows ``label``, columns ``shots``."""
    g = frame.groupby(["label", "shots"], sort=False)[metric]
    mean = g.mean().unstack("shots")
    std = g.std(ddof=0).unstack("shots")
    out = mean.round(ndigits).astype(str) + " ± " + std.round(ndigits).astype(str)
    out.columns = [f"K={k}" for k in out.columns]
    return out


def task_table(frame, metric: str = "test_accuracy", ndigits: int = 1):
    """Method x task table: rows are datasets plus an ``"average"`` row, columns are labels.

    Each cell is the mean of ``metric`` over the seeds (and shots) in ``frame``; the average
    row is the plain mean over the datasets, as CoOp's and Tip-Adapter's tables report.
    ``frame`` is one or more :func:`run_sweep` frames concatenated.
    """
    import pandas as pd

    labels = list(dict.fromkeys(frame["label"]))
    datasets = list(dict.fromkeys(frame["dataset"]))
    table = frame.groupby(["dataset", "label"], sort=False)[metric].mean().unstack("label")
    table = table.loc[datasets, labels]
    table.loc["average"] = table.mean(axis=0)
    table.columns.name = None
    table.index.name = None
    return pd.DataFrame(table).round(ndigits)
