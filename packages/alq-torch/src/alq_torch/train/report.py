"""Reports of a comparison: the Table-1-style table, results.json / results.csv, PNG plots."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

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
)


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

    Parameters
    ----------
    results : sequence of dict
        :meth:`RunResult.to_dict` of every run.
    same_grads : dict, optional
        Method -> normalized variances of its final levels on the shared probe
        gradients (one per seed).
    """
    order: list[str] = []
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["method"] not in by:
            order.append(r["method"])
            by[r["method"]] = []
        by[r["method"]].append(r)
    fp32_bits = None
    for r in results:
        if r["method"] == "fp32":
            fp32_bits = r["bits_per_step"]
    if fp32_bits is None and results:
        fp32_bits = 8 * (40 + 4 * int(results[0]["num_params"]))
    rows = []
    for m in order:
        rs = by[m]
        accs = [r["final_val_acc"] for r in rs]
        steps = sum(r["steps"] for r in rs)
        train = sum(r["train_seconds"] for r in rs)
        rows.append(
            {
                "method": m,
                "bits": rs[0]["bits"] if m != "fp32" else 32,
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
        "gradients. quant % / update % = share of training time spent quantizing+averaging / updating levels."
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
    """Mean over seeds of ``key`` against step (steps common to all seeds)."""
    per_seed = []
    for r in results:
        if r["method"] != method:
            continue
        pts = {int(h["step"]): h[key] for h in r["history"] if h.get(key) is not None and math.isfinite(h[key])}
        per_seed.append(pts)
    if not per_seed:
        return np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(p) for p in per_seed)))
    return np.array(common, dtype=float), np.array([np.mean([p[s] for p in per_seed]) for s in common])


def plot_all(results: Sequence[dict[str, Any]], out_dir: str, *, title: str = "") -> list[str]:
    """Write accuracy.png, variance.png and levels.png into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: list[str] = []
    for r in results:
        if r["method"] not in methods:
            methods.append(r["method"])
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
    ax.set_title(f"Validation accuracy (mean over seeds){' — ' + title if title else ''}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    paths.append(save(fig, "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        if m == "fp32":
            continue
        x, y = _series(results, m, "variance")
        if x.size:
            ax.plot(x, y, label=m, color=colors[m], lw=1.6)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(r"$\|Q(g)-g\|^2 / \|g\|^2$")
    ax.set_title(f"Normalized quantization variance{' — ' + title if title else ''}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    paths.append(save(fig, "variance.png"))

    adaptive = [m for m in methods if m in ("alq", "alq-n", "amq", "amq-n")]
    if adaptive:
        fig, axes = plt.subplots(1, len(adaptive), figsize=(3.6 * len(adaptive), 3.8), sharey=True, squeeze=False)
        for ax, m in zip(axes[0], adaptive):
            run = next(r for r in results if r["method"] == m)
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
        fig.suptitle(f"Evolution of the adaptive levels{' — ' + title if title else ''}", fontsize=10)
        paths.append(save(fig, "levels.png"))
    return paths


__all__ = ["CSV_COLUMNS", "format_table", "plot_all", "summarize", "write_csv", "write_json"]
