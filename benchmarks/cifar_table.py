"""Merge several ``alq-train`` output directories into one comparison table, next to the paper's numbers.

The CIFAR-10 runs of the rebuttal table are run as independent ``alq-train`` processes (one per
method and seed, side by side on one GPU); this collects their ``results.json`` files:

    python benchmarks/cifar_table.py OUT_PREFIX DIR [DIR ...] [--paper rebuttal-k16]

and writes ``OUT_PREFIX.md`` (accuracy mean ± std over seeds, the normalized variance over
training, the error on the largest 1 % of coordinates, the error of the averaged update, bits
on the wire, time per step), ``OUT_PREFIX.json`` and ``OUT_PREFIX.png`` (validation accuracy
against step, mean over seeds; normalized variance against step). With ``--group-by`` a
setting (``bucket_size`` or ``bits``) it tabulates accuracy per method against that setting
instead (the bucket-size and bits sweeps) and plots it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

#: The seed's rebuttal table: ResNet-32, CIFAR-10, 3 bits, bucket 16384, validation accuracy %
#: at 16 / 32 simulated GPUs (SPEC section 11).
PAPER = {
    "rebuttal-k16": {"fp32": 92.17, "nuqsgd": 85.82, "qsgdinf": 89.61, "trn": 88.68, "alq": 91.91, "alq-n": 92.07,
                     "amq": 91.58, "amq-n": 91.41},
    "rebuttal-k32": {"fp32": 92.19, "nuqsgd": 86.36, "qsgdinf": 89.81, "trn": 90.22, "alq": 91.89, "alq-n": 91.83,
                     "amq": 91.38, "amq-n": 91.40},
}  # fmt: skip


def load_runs(dirs: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every run under ``dirs``, and the settings of the first directory.

    A directory's ``results.json`` when the comparison finished; otherwise its finished runs
    (``runs/*.json``, written as each run ends) with the settings of its ``config.json``, so a
    comparison stopped at a deadline still contributes the runs it completed.
    """
    runs: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    for d in dirs:
        path = Path(d) / "results.json"
        if path.is_file():
            res = json.loads(path.read_text())
            found, s, device = res["runs"], res["settings"], res.get("device")
        else:
            cfg = Path(d) / "config.json"
            found = [json.loads(f.read_text()) for f in sorted((Path(d) / "runs").glob("*.json"))]
            if not cfg.is_file() or not found:
                msg = (
                    f"{d}: neither results.json nor config.json with finished runs/*.json; "
                    "expected an alq-train output directory"
                )
                raise FileNotFoundError(msg)
            s, device = json.loads(cfg.read_text()), None
        settings = settings or s
        for r in found:
            r["_settings"] = s
            r["_device"] = device
            runs.append(r)
    return runs, settings


def _label(r: dict[str, Any]) -> str:
    return str(r["method"]) + ("+1d" if r.get("exact_1d") else "")


def _logged(r: dict[str, Any], key: str) -> list[float]:
    """The finite values of ``key`` over the run's history, in step order."""
    return [h[key] for h in r.get("history", []) if h.get(key) is not None and math.isfinite(h[key])]


def _mean_over_history(r: dict[str, Any], key: str) -> float:
    vals = _logged(r, key)
    return float(np.mean(vals)) if vals else float("nan")


def _last(r: dict[str, Any], key: str) -> float:
    vals = _logged(r, key)
    return float(vals[-1]) if vals else float("nan")


def summarize(runs: list[dict[str, Any]], group_by: str | None = None) -> list[dict[str, Any]]:
    """One row per method label (and ``group_by`` value): accuracy mean/std over seeds and the rest."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        key = r[group_by] if group_by else None
        groups[(_label(r), key)].append(r)
    rows = []
    for (label, key), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
        acc = np.array([100 * r["final_val_acc"] for r in rs])
        rows.append(
            {
                "method": label,
                group_by or "setting": key,
                "seeds": [r["seed"] for r in rs],
                "acc_mean": float(acc.mean()),
                "acc_std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
                "best_acc_mean": float(np.mean([100 * r["best_val_acc"] for r in rs])),
                "train_loss_end": float(np.nanmean([_last(r, "loss") for r in rs])),
                "variance_mean": float(np.nanmean([_mean_over_history(r, "variance") for r in rs])),
                "top_error_mean": float(np.nanmean([_mean_over_history(r, "top_error") for r in rs])),
                "avg_error_mean": float(np.nanmean([_mean_over_history(r, "avg_error") for r in rs])),
                "bits_per_step_per_worker": float(rs[0]["bits_per_step"]),
                "step_ms": float(np.mean([1000 * r["train_seconds"] / max(1, r["steps"]) for r in rs])),
                "steps": int(rs[0]["steps"]),
                "diverged": [r["diverged_at"] for r in rs if r.get("diverged_at") is not None],
            }
        )
    return rows


def predictors(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Spearman rank correlation, across the quantized methods, of accuracy with each error measure.

    Strongly negative: the measure predicts accuracy (lower error, higher accuracy).
    """
    from scipy.stats import spearmanr

    q = [r for r in rows if r["method"] != "fp32" and math.isfinite(r["variance_mean"])]
    out: dict[str, float] = {}
    if len(q) < 3:
        return out
    acc = [r["acc_mean"] for r in q]
    for key in ("variance_mean", "top_error_mean", "avg_error_mean"):
        vals = [r[key] for r in q]
        if all(math.isfinite(v) for v in vals):
            out[key] = float(spearmanr(acc, vals).statistic)
    return out


def markdown(rows: list[dict[str, Any]], paper: dict[str, float] | None, fp32_bits: float | None) -> str:
    head = (
        "| method | val acc % (mean ± std, n) | paper % | train loss (end) | norm. variance (mean over training) "
        "| top-1% error | error of the average | wire / step / worker | step ms |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = paper.get(r["method"].split("+")[0]) if paper else None
        bits = r["bits_per_step_per_worker"]
        ratio = f" ({bits / fp32_bits:.3f}x)" if fp32_bits else ""
        lines.append(
            f"| {r['method']} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} ({len(r['seeds'])}) | "
            f"{'' if ref is None else f'{ref:.2f}'} | {r['train_loss_end']:.3g} | {r['variance_mean']:.3g} | {r['top_error_mean']:.3g} | "
            f"{r['avg_error_mean']:.3g} | {bits / 8e3:.1f} kB{ratio} | {r['step_ms']:.1f} |"
        )
    return "\n".join(lines)


def sweep_markdown(rows: list[dict[str, Any]], group_by: str) -> str:
    """Accuracy, then the normalized variance over training, per method (rows) and ``group_by`` value (columns)."""
    keys = sorted({r[group_by] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "fp32", m))
    by = {(r["method"], r[group_by]): r for r in rows}
    head = " | ".join(f"{group_by} {k}" for k in keys)
    rule = "|---" * (1 + len(keys)) + "|"
    acc = [f"| val acc % | {head} |", rule]
    var = [f"| norm. variance | {head} |", rule]
    for m in methods:
        a, v = [], []
        for k in keys:
            r = by.get((m, k))
            a.append(
                "" if r is None else f"{r['acc_mean']:.2f}" + (f" ± {r['acc_std']:.2f}" if len(r["seeds"]) > 1 else "")
            )
            v.append("" if r is None else f"{r['variance_mean']:.3g}")
        acc.append(f"| {m} | " + " | ".join(a) + " |")
        if m != "fp32":
            var.append(f"| {m} | " + " | ".join(v) + " |")
    return "\n".join(acc) + "\n\n" + "\n".join(var)


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path, group_by: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if group_by:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for m in sorted({r["method"] for r in rows}):
            pts = sorted((r[group_by], r["acc_mean"], r["variance_mean"]) for r in rows if r["method"] == m)
            if m == "fp32":  # one setting suffices: full precision does not depend on the quantizer's
                a1.axhline(float(np.mean([p[1] for p in pts])), color="k", linestyle="--", label=m)
                continue
            a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=m)
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(group_by)
        a1.set_ylabel("validation accuracy %")
        a2.set_yscale("log")
        a2.set_ylabel("normalized variance (mean over training)")
        a1.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_label[_label(r)].append(r)
    palette = plt.get_cmap("tab10" if len(by_label) <= 10 else "tab20")
    for i, (label, rs) in enumerate(sorted(by_label.items())):
        color = palette(i)  # one colour per method, the same in both panels
        curves = [[(h["step"], 100 * h["val_acc"]) for h in r["history"] if "val_acc" in h] for r in rs]
        n = min(len(c) for c in curves)
        accs = np.array([[a for _, a in c[:n]] for c in curves])
        a1.plot([st for st, _ in curves[0][:n]], accs.mean(axis=0), label=label, color=color)
        vs = [(h["step"], h["variance"]) for h in rs[0]["history"] if h.get("variance") is not None]
        if vs and label != "fp32":
            a2.plot([v[0] for v in vs], [v[1] for v in vs], label=label, color=color)
    a1.set_xlabel("step")
    a1.set_ylabel("validation accuracy % (mean over seeds)")
    a1.legend(fontsize=7, ncol=2)
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("normalized quantization variance (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output prefix (writes .md, .json, .png)")
    ap.add_argument("dirs", nargs="+", help="alq-train output directories")
    ap.add_argument("--paper", choices=sorted(PAPER), default=None, help="the paper's column to show")
    ap.add_argument("--group-by", choices=["bucket_size", "bits"], default=None)
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    runs, settings = load_runs(args.dirs)
    rows = summarize(runs, args.group_by)
    out = Path(args.out)
    if args.group_by:
        md = sweep_markdown(rows, args.group_by)
    else:
        fp32 = [r for r in runs if r["method"] == "fp32"]
        md = markdown(rows, PAPER.get(args.paper) if args.paper else None, fp32[0]["bits_per_step"] if fp32 else None)
    corr = predictors(rows)  # in a sweep: across every quantized (method, setting) row
    if corr:
        across = "quantized (method, setting) pairs" if args.group_by else "quantized methods"
        md += f"\n\nSpearman correlation of accuracy with each measure across the {across}: " + ", ".join(
            f"{k.removesuffix('_mean')} {v:+.2f}" for k, v in corr.items()
        )
    s = settings
    grouped = {args.group_by} if args.group_by else set()
    parts = [f"{s.get('model')} on {s.get('data')}"]
    parts += [f"{s.get('bits')} bits"] if "bits" not in grouped else []
    parts += [f"bucket {s.get('bucket_size')}"] if "bucket_size" not in grouped else []
    parts += [f"K={s.get('workers')}", f"batch {s.get('batch_size')}/worker", f"{runs[0]['steps']} steps"]
    # a run stopped before its results.json names no device; the others do
    devices = sorted({str(r["_device"]) for r in runs if r.get("_device")}) or ["unknown"]
    about = ", ".join([*parts, f"device {'/'.join(devices)}"])
    out.with_suffix(".md").write_text(f"{args.title}\n\n{about}\n\n{md}\n" if args.title else f"{about}\n\n{md}\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows, "spearman": corr}, indent=1))
    plot(runs, rows, out.with_suffix(".png"), args.group_by)
    print(about)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
