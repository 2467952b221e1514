"""Reports of a comparison: the Table-1-style table, results.json / results.csv, PNG plots.

Besides accuracy and the normalized variance, runs record measured errors that
say where the quantization error lands (:func:`alq_torch.error_metrics`):
``top_error`` (relative error on each worker's largest 1% of coordinates),
``top_share`` (share of the error energy there), ``avg_error`` (error of the
averaged update the optimizer applies), ``err_1d`` / ``err_nd`` (relative error
of the 1-D tensors, i.e. biases and norms, and of the rest) and the worst layer.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from alq_core import METHODS

if TYPE_CHECKING:
    from .._simulate import SimulatedStep

#: Measured-error keys that the training loop writes into history entries at log steps.
HISTORY_ERROR_KEYS = ("top_error", "top_share", "avg_error", "err_1d", "err_nd", "worst_layer_error")

#: Columns of results.csv, in order.
CSV_COLUMNS = (
    "method",
    "bits",
    "bucket_size",
    "workers",
    "seeds",
    "val_acc_mean",
    "val_acc_std",
    "val_loss_mean",
    "variance",
    "variance_same_grads",
    "bits_per_step",
    "wire_ratio_vs_fp32",
    "step_ms",
    "quantize_share",
    "update_share",
    "num_updates",
    "diverged",
    "exact_1d",
    "top_error",
    "top_share",
    "avg_error",
    "err_1d",
    "err_nd",
    "worst_layer",
    "worst_layer_error",
    "variance_run_mean",
    "top_error_run_mean",
    "avg_error_run_mean",
)


def measured_errors(step: SimulatedStep, one_d: Sequence[str]) -> dict[str, Any]:
    """The measured errors of one :meth:`SimulatedWorkers.reduce` call (``measure=True``, ``layers=`` given).

    Parameters
    ----------
    step : SimulatedStep
    one_d : sequence of str
        Names of the 1-D parameter tensors (biases, norm weights/biases).

    Returns
    -------
    dict
        :data:`HISTORY_ERROR_KEYS` (floats; NaN when not measured), ``worst_layer``
        (name of the layer with the largest relative error) and ``layers``
        (layer name -> relative error).
    """
    nan = float("nan")
    m = step.metrics
    if m is None:
        return {**dict.fromkeys(HISTORY_ERROR_KEYS, nan), "worst_layer": "", "layers": {}}
    out: dict[str, Any] = {"top_error": m.top_error, "top_share": m.top_share, "avg_error": m.avg_error}
    if m.layer_names:
        one = [n for n in one_d if n in set(m.layer_names)]
        rest = [n for n in m.layer_names if n not in set(one)]
        worst, worst_err = m.worst_layer()
        out.update(
            err_1d=m.group_error(one),
            err_nd=m.group_error(rest),
            worst_layer_error=worst_err,
            worst_layer=worst,
            layers=m.layers,
        )
    else:
        out.update(err_1d=nan, err_nd=nan, worst_layer_error=nan, worst_layer="", layers={})
    return out


def label(result: dict[str, Any]) -> str:
    """The method label of a run in tables and plots: ``"alq+1d"`` when the 1-D tensors went exactly."""
    m = str(result["method"])
    return f"{m}+1d" if result.get("exact_1d") and m != "fp32" else m


def _run_mean(r: dict[str, Any], key: str) -> float:
    """Mean of ``key`` over a run's logged history entries (finite values)."""
    return _mean([h[key] for h in r.get("history", []) if h.get(key) is not None])


def _worst_layer(rs: Sequence[dict[str, Any]]) -> tuple[str, float]:
    """The layer with the largest final relative error averaged over seeds."""
    per: dict[str, list[float]] = {}
    for r in rs:
        for name, v in (r.get("final_errors") or {}).get("layers", {}).items():
            per.setdefault(name, []).append(v)
    means = [(_mean(v), name) for name, v in per.items()]
    means = [(v, name) for v, name in means if math.isfinite(v)]
    if not means:
        return "", float("nan")
    v, name = max(means, key=lambda t: t[0])
    return name, v


def _mean(vals: Sequence[float]) -> float:
    good = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(good)) if good else float("nan")


def _std(vals: Sequence[float]) -> float:
    good = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.std(good, ddof=1)) if len(good) > 1 else 0.0


def summarize(
    results: Sequence[dict[str, Any]], same_grads: dict[str, list[float]] | None = None
) -> list[dict[str, Any]]:
    """One row per method (in first-seen order), aggregated over seeds.

    Rows are keyed by :func:`label` (``"alq+1d"`` for runs with ``exact_1d``);
    ``base_method`` holds the method name.

    Parameters
    ----------
    results : sequence of dict
        :meth:`RunResult.to_dict` of every run.
    same_grads : dict, optional
        Method label -> normalized variances of its final levels on the shared probe
        gradients (one per seed).
    """
    order: list[str] = []
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        key = label(r)
        if key not in by:
            order.append(key)
            by[key] = []
        by[key].append(r)
    fp32_bits = None
    for r in results:
        if r["method"] == "fp32":
            fp32_bits = r["bits_per_step"]
    if fp32_bits is None and results:
        fp32_bits = 8 * (40 + 4 * int(results[0]["num_params"]))
    rows = []
    for m in order:
        rs = by[m]
        base = str(rs[0]["method"])
        accs = [r["final_val_acc"] for r in rs]
        steps = sum(r["steps"] for r in rs)
        train = sum(r["train_seconds"] for r in rs)
        final_keys = ("top_error", "top_share", "avg_error", "err_1d", "err_nd")
        worst = _worst_layer(rs)
        rows.append(
            {
                "method": m,
                "base_method": base,
                "bits": rs[0]["bits"] if base != "fp32" else 32,
                "bucket_size": rs[0]["bucket_size"],
                "workers": rs[0]["workers"],
                "seeds": len(rs),
                "val_acc_mean": _mean(accs),
                "val_acc_std": _std(accs),
                "val_loss_mean": _mean([r.get("final_val_loss", float("nan")) for r in rs]),
                "variance": _mean([r["final_variance"] for r in rs]),
                "variance_same_grads": _mean((same_grads or {}).get(m, [])),
                "bits_per_step": int(rs[0]["bits_per_step"]),
                "wire_ratio_vs_fp32": float(rs[0]["bits_per_step"]) / float(fp32_bits) if fp32_bits else float("nan"),
                "step_ms": 1000.0 * train / steps if steps else float("nan"),
                "quantize_share": sum(r["quantize_seconds"] for r in rs) / train if train else 0.0,
                "update_share": sum(r["update_seconds"] for r in rs) / train if train else 0.0,
                "num_updates": int(rs[0]["num_updates"]),
                "diverged": sum(1 for r in rs if r.get("diverged_at") is not None),
                "exact_1d": bool(rs[0].get("exact_1d", False)),
                **{k: _mean([(r.get("final_errors") or {}).get(k, float("nan")) for r in rs]) for k in final_keys},
                "worst_layer": worst[0],
                "worst_layer_error": worst[1],
                "variance_run_mean": _mean([_run_mean(r, "variance") for r in rs]),
                "top_error_run_mean": _mean([_run_mean(r, "top_error") for r in rs]),
                "avg_error_run_mean": _mean([_run_mean(r, "avg_error") for r in rs]),
            }
        )
    return rows


def _fmt_var(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    if v == 0:
        return "0"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.2e}"


def _fmt_bits(b: int) -> str:
    if b >= 8e6:
        return f"{b / 8e6:.2f} MB"
    if b >= 8e3:
        return f"{b / 8e3:.1f} kB"
    return f"{b / 8:.0f} B"


def format_table(rows: Sequence[dict[str, Any]], *, title: str | None = None) -> str:
    """The comparison as a fixed-width text table (the paper's Table 1, plus overheads)."""
    head = (
        "method",
        "bits",
        "bucket",
        "K",
        "val acc % (mean ± std)",
        "val loss",
        "qvar (own)",
        "qvar (same g)",
        "top1% err",
        "avg err",
        "wire/step/worker",
        "step ms",
        "quant %",
        "update %",
    )
    body = []
    for r in rows:
        body.append(
            (
                r["method"],
                str(r["bits"]),
                str(r["bucket_size"]),
                str(r["workers"]),
                f"{100 * r['val_acc_mean']:.2f} ± {100 * r['val_acc_std']:.2f} (n={r['seeds']}"
                + (f", {r['diverged']} diverged)" if r.get("diverged") else ")"),
                f"{r['val_loss_mean']:.3f}" if math.isfinite(r["val_loss_mean"]) else "-",
                _fmt_var(r["variance"]),
                _fmt_var(r["variance_same_grads"]),
                _fmt_var(r.get("top_error", float("nan"))),
                _fmt_var(r.get("avg_error", float("nan"))),
                f"{_fmt_bits(r['bits_per_step'])} ({r['wire_ratio_vs_fp32']:.3f}x)",
                f"{r['step_ms']:.1f}",
                f"{100 * r['quantize_share']:.1f}",
                f"{100 * r['update_share']:.2f}",
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)))
    lines.append(
        "qvar = normalized quantization variance ||Q(g)-g||^2/||g||^2 per worker gradient: (own) on the run's "
        "own gradients at its last step; (same g) every method's final levels on one shared set of worker "
        "gradients. top1% err = ||Q(g)-g||^2/||g||^2 on each worker's largest 1% of coordinates; avg err = "
        "||mean_k Q(g_k) - mean_k g_k||^2/||mean_k g_k||^2, the error of the averaged update (both at the "
        "last log step). +1d = 1-D tensors (biases, norms) sent exactly in fp32. "
        "quant % / update % = share of training time spent quantizing+averaging / updating levels."
    )
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON (non-finite floats become null)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_clean(payload), fh, indent=1)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """One line per method, columns :data:`CSV_COLUMNS`."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _series(results: Sequence[dict[str, Any]], method: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds of ``key`` against step (steps common to all seeds); ``method`` is a :func:`label`."""
    per_seed = []
    for r in results:
        if label(r) != method:
            continue
        pts = {int(h["step"]): h[key] for h in r["history"] if h.get(key) is not None and math.isfinite(h[key])}
        per_seed.append(pts)
    if not per_seed:
        return np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(p) for p in per_seed)))
    return np.array(common, dtype=float), np.array([np.mean([p[s] for p in per_seed]) for s in common])


def _titled(what: str, title: str) -> str:
    """A plot title: ``what``, then the run's ``title`` on a second line (long titles do not run off the figure)."""
    return f"{what}\n{title}" if title else what


def plot_all(results: Sequence[dict[str, Any]], out_dir: str, *, title: str = "") -> list[str]:
    """Write accuracy.png, variance.png, errors.png and levels.png into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: list[str] = []
    base: dict[str, str] = {}
    for r in results:
        if label(r) not in methods:
            methods.append(label(r))
            base[label(r)] = str(r["method"])
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    paths = []

    def save(fig: Any, name: str) -> str:
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        x, y = _series(results, m, "val_acc")
        if x.size:
            ax.plot(x, 100 * y, label=m, color=colors[m], lw=1.6, ls="--" if m == "fp32" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(_titled("Validation accuracy (mean over seeds)", title), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    paths.append(save(fig, "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        if base[m] == "fp32":
            continue
        x, y = _series(results, m, "variance")
        if x.size:
            ax.plot(x, y, label=m, color=colors[m], lw=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\|Q(g)-g\|^2 / \|g\|^2$")
    ax.set_title(_titled("Normalized quantization variance", title), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    else:  # fp32 only, or FSDP runs (whose comms do not measure the variance)
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.4")
    paths.append(save(fig, "variance.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, key, name in (
        (axes[0][0], "top_error", "relative error on the top 1% of coordinates"),
        (axes[0][1], "avg_error", r"error of the averaged update $\|\bar Q - \bar g\|^2/\|\bar g\|^2$"),
    ):
        for m in methods:
            if base[m] == "fp32":
                continue
            x, y = _series(results, m, key)
            if x.size and bool(np.all(y > 0)):
                ax.plot(x, y, label=m, color=colors[m], lw=1.6)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2)
    fig.suptitle(_titled("Measured errors", title), fontsize=10)
    paths.append(save(fig, "errors.png"))

    adaptive = [m for m in methods if base[m] in METHODS and METHODS[base[m]].adaptive]
    if adaptive:
        fig, axes = plt.subplots(1, len(adaptive), figsize=(3.6 * len(adaptive), 3.8), sharey=True, squeeze=False)
        for ax, m in zip(axes[0], adaptive):
            run = next(r for r in results if label(r) == m)
            hist = run["levels"]
            steps = [h["step"] for h in hist] + [run["steps"]]
            table = np.array([h["levels"] for h in hist])
            pos = table[:, table.shape[1] // 2 :]
            for j in range(pos.shape[1]):
                ax.step(steps, [*list(pos[:, j]), pos[-1, j]], where="post", lw=1.5)
            ax.set_yscale("log")
            ax.set_title(f"{m} (seed {run['seed']})", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel("positive levels")
        fig.suptitle(_titled("Evolution of the adaptive levels", title), fontsize=10)
        paths.append(save(fig, "levels.png"))
    return paths


__all__ = [
    "CSV_COLUMNS",
    "HISTORY_ERROR_KEYS",
    "format_table",
    "label",
    "measured_errors",
    "plot_all",
    "summarize",
    "write_csv",
    "write_json",
]
