"""How close each method's level table gets to the best table possible, on real gradients.

Collects gradients from real training (the digits MLP, ResNet-32 on CIFAR-10, a small
character-level transformer language model on Python source text) at several training
stages, then, per gradient, bits and bucket size, fits every method's table on that very
gradient and reports the exact expected variance ``E||Q(g) - g||^2 / ||g||^2`` next to the
oracle's optimum (:func:`alq_core.optimal_levels`) for the L2 and the max-abs scale, and the
relative error on the largest 1 % of coordinates.

    PYTHONPATH=packages/alq-core/src:packages/alq-torch/src \\
        python benchmarks/level_quality.py --cifar DIR --out benchmarks/results/level_quality.json

``--smoke`` runs the digits MLP only, tiny settings (the CPU test in ``test_scripts.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

PAPER = ("alq", "alq-n", "amq", "amq-n")
FIXED = ("qsgd", "qsgdinf", "nuqsgd")
NEW = ("alq-e", "alq-einf")


# ----------------------------------------------------------------------------- gradients
def _digits(stages: list[int], seed: int) -> dict[str, np.ndarray]:
    import torch
    from alq_torch.train.data import load_data
    from alq_torch.train.models import build_model

    torch.manual_seed(seed)
    data = load_data("digits")
    model = build_model("mlp", data.input_shape, data.num_classes)
    return _train_and_grab("mlp-digits", model, data, stages, batch=32, lr=0.05, device=torch.device("cpu"))


def _cifar(root: str, stages: list[int], seed: int, device: Any) -> dict[str, np.ndarray]:
    import torch
    from alq_torch.train.data import load_data
    from alq_torch.train.models import build_model

    torch.manual_seed(seed)
    data = load_data("cifar10", data_dir=root).to(device)
    model = build_model("resnet32", data.input_shape, data.num_classes).to(device)
    return _train_and_grab("resnet32-cifar10", model, data, stages, batch=128, lr=0.1, device=device)


def _train_and_grab(name: str, model: Any, data: Any, stages: list[int], batch: int, lr: float, device: Any) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    out: dict[str, np.ndarray] = {}
    n = data.x_train.shape[0]
    for step in range(max(stages) + 1):
        idx = torch.randint(0, n, (batch,), generator=gen, device=device)
        x = data.prepare(data.x_train[idx], gen, True)
        loss = F.cross_entropy(model(x), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step in stages:
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
            out[f"{name}@{step}"] = g.float().cpu().numpy()
        opt.step()
    return out


def _text_corpus(limit: int = 2_000_000) -> bytes:
    root = os.path.dirname(os.__file__)
    chunks, size = [], 0
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    b = fh.read()
                chunks.append(b)
                size += len(b)
                if size >= limit:
                    return b"".join(chunks)
    return b"".join(chunks)


def _transformer(stages: list[int], seed: int, device: Any, small: bool = False) -> dict[str, np.ndarray]:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    text = torch.tensor(np.frombuffer(_text_corpus(200_000 if small else 2_000_000), dtype=np.uint8).astype(np.int64))
    ctx, dim, layers = (32, 32, 1) if small else (128, 192, 4)

    class CharLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(256, dim)
            self.pos = nn.Parameter(torch.zeros(ctx, dim))
            layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, layers)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
            h = self.body(self.emb(x) + self.pos[: x.shape[1]], mask=mask, is_causal=True)
            return self.head(self.norm(h))

    model = CharLM().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    text = text.to(device)
    out: dict[str, np.ndarray] = {}
    for step in range(max(stages) + 1):
        starts = torch.randint(0, text.numel() - ctx - 1, (64,), generator=gen).to(device)
        idx = starts[:, None] + torch.arange(ctx + 1, device=device)[None, :]
        seq = text[idx]
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step in stages:
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
            out[f"charlm@{step}"] = g.float().cpu().numpy()
        opt.step()
    return out


# ----------------------------------------------------------------------------- evaluation
def _top_error(g: np.ndarray, levels: np.ndarray, cfg: Any) -> float:
    """Expected relative error ``E||Q(g) - g||^2 / ||g||^2`` on the largest 1 % of ``|g|``."""
    import alq_core as alq

    v, s = alq.normalized_coordinates(g, cfg)
    m = v.size
    w = np.repeat(np.nan_to_num(s.astype(np.float64)) ** 2, cfg.bucket_size)[:m]
    k = max(1, m // 100)
    top = np.argpartition(-np.abs(g[:m]), k - 1)[:k]
    lv = levels.astype(np.float64)
    vt = v[top].astype(np.float64)
    j = np.clip(np.searchsorted(lv, vt, side="right") - 1, 0, lv.size - 2)
    err = float(np.dot(w[top], (lv[j + 1] - vt) * (vt - lv[j])))
    energy = float(np.dot(g[top].astype(np.float64), g[top].astype(np.float64)))
    return err / energy if energy > 0 else float("nan")


def _evaluate(task: tuple[str, np.ndarray, int, int, int]) -> list[dict[str, Any]]:
    import alq_core as alq

    name, g, bits, d, grid = task
    rows: list[dict[str, Any]] = []
    oracle: dict[str, Any] = {}
    for norm in ("l2", "linf"):
        cfg = alq.QuantizerConfig("alq-e", bits=bits, bucket_size=d, norm=norm)
        res = alq.optimal_levels(g, cfg, grid=grid)
        oracle[norm] = res
        rows.append(
            {
                "gradient": name, "bits": bits, "bucket": d, "method": f"optimum-{norm}", "norm": norm,
                "variance": res.variance, "lower_bound": res.lower_bound, "exact": res.exact,
                "top1_error": _top_error(g, res.levels, cfg), "seconds": res.seconds,
            }
        )  # fmt: skip
    for method in (*FIXED, *PAPER, *NEW):
        cfg = alq.QuantizerConfig(method, bits=bits, bucket_size=d)
        q = alq.AdaptiveQuantizer(cfg)
        t0 = time.perf_counter()
        if q.adaptive:
            report = q.update(alq.compute_stats(g, cfg), step=0)
            reason = report.reason
        else:
            reason = "fixed"
        fit_s = time.perf_counter() - t0
        var = alq.empirical_variance(g, q.levels, cfg)
        rows.append(
            {
                "gradient": name, "bits": bits, "bucket": d, "method": method, "norm": cfg.norm,
                "variance": var, "vs_optimum": var / oracle[cfg.norm].variance,
                "top1_error": _top_error(g, q.levels, cfg), "seconds": fit_s, "reason": reason,
            }
        )  # fmt: skip
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's criteria: new methods vs their optimum; alq-einf vs the best paper method."""
    by = {(r["gradient"], r["bits"], r["bucket"], r["method"]): r for r in rows}
    keys = sorted({(r["gradient"], r["bits"], r["bucket"]) for r in rows})
    ratio_e = [by[(*k, "alq-e")]["vs_optimum"] for k in keys]
    ratio_einf = [by[(*k, "alq-einf")]["vs_optimum"] for k in keys]
    gains = []
    for k in keys:
        if k[2] >= 1024:
            best = min(by[(*k, m)]["variance"] for m in (*PAPER, "qsgdinf"))
            gains.append(best / by[(*k, "alq-einf")]["variance"])
    return {
        "alq-e_vs_optimum_max": max(ratio_e),
        "alq-einf_vs_optimum_max": max(ratio_einf),
        "alq-einf_gain_over_best_paper_min_bucket_ge_1024": min(gains) if gains else None,
        "alq-einf_gain_over_best_paper_median_bucket_ge_1024": float(np.median(gains)) if gains else None,
        "cases": len(keys),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: variance per method, one line per (gradient, bits, bucket)."""
    methods = ["qsgdinf", "nuqsgd", *PAPER, "alq-e", "alq-einf", "optimum-l2", "optimum-linf"]
    by = {(r["gradient"], r["bits"], r["bucket"], r["method"]): r for r in rows}
    keys = sorted({(r["gradient"], r["bits"], r["bucket"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    lines = ["| gradient | bits | bucket | " + " | ".join(methods) + " |", "|---" * (3 + len(methods)) + "|"]
    for k in keys:
        cells = [f"{by[(*k, m)]['variance']:.3g}" for m in methods]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    lines += ["", "Relative error on the largest 1 % of coordinates:", ""]
    lines += ["| gradient | bits | bucket | " + " | ".join(methods) + " |", "|---" * (3 + len(methods)) + "|"]
    for k in keys:
        cells = [f"{by[(*k, m)]['top1_error']:.3g}" for m in methods]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", help="CIFAR-10 directory (python batches or class-folder tree); skipped if absent")
    ap.add_argument("--out", required=True, help="JSON file to write (a .md table beside it)")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--buckets", type=int, nargs="+", default=[128, 1024, 8192, 16384])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 300, 1500])
    ap.add_argument("--grid", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="digits MLP only, tiny settings")
    args = ap.parse_args(argv)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    grads: dict[str, np.ndarray] = {}
    if args.smoke:
        grads.update(_digits([0, 20], seed=0))
        grads.update(_transformer([0], seed=0, device=torch.device("cpu"), small=True))
        bits, buckets, grid = [3], [128], 64
    else:
        grads.update(_digits(args.stages, seed=0))
        if args.cifar:
            grads.update(_cifar(args.cifar, args.stages, seed=0, device=device))
        grads.update(_transformer(args.stages, seed=0, device=device))
        bits, buckets, grid = args.bits, args.buckets, args.grid
    collect_s = time.perf_counter() - t0
    tasks = [(name, g, b, d, grid) for name, g in grads.items() for b in bits for d in buckets]
    rows: list[dict[str, Any]] = []
    if args.workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(args.workers) as ex:
            for part in ex.map(_evaluate, tasks):
                rows.extend(part)
    else:
        for t in tasks:
            rows.extend(_evaluate(t))
    summary = summarize(rows)
    for r in rows:
        for key, val in list(r.items()):
            if isinstance(val, float) and not math.isfinite(val):
                r[key] = None
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "gradients": {k: int(v.size) for k, v in grads.items()},
        "collect_seconds": collect_s,
        "evaluate_seconds": time.perf_counter() - t0 - collect_s,
        "summary": summary,
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    md = table(rows)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(f"`{result['command']}`\n\n{md}\n\nSummary: {json.dumps(summary)}\n")
    print(md)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
