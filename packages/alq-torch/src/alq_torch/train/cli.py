"""``alq-train``: train with every quantization method side by side and report like the paper.

Without arguments it runs the default comparison: every method, 2 bits,
K = 16 simulated workers, an MLP on scikit-learn's bundled handwritten digits,
three seeds; a few minutes on a 2-core CPU. Under ``torchrun`` (``WORLD_SIZE``
> 1) the same flags train with real DDP and the ALQ communication hook, or with
``--fsdp`` (and ``--shard-size``) with FSDP2 and ALQ's quantized reduce-scatter or
hybrid-sharding all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .data import DATA_NAMES, load_data
from .loop import probe_gradients, resolve_steps, train_run
from .report import format_table, plot_all, summarize, write_csv, write_json
from .settings import ALL_METHODS as ALL_METHODS  # re-exported (defined beside the settings they name)
from .settings import DEFAULTS as DEFAULTS
from .settings import PRESETS as PRESETS
from .settings import layout_of, resolve, run_config, versions
from .workers import AMP_MODES, WORKERS_MODES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``alq-train``."""
    p = argparse.ArgumentParser(
        prog="alq-train",
        description=(
            "Train with several gradient quantization methods side by side (K simulated workers on one "
            "device, or real DDP under torchrun) and report validation accuracy, normalized quantization "
            "variance, bits on the wire and the time spent quantizing and updating levels, like Table 1 "
            "of Faghri et al., NeurIPS 2020. With no arguments: every method, 2 bits, bucket 1024, K=16 workers, "
            "an MLP on the built-in handwritten digits, 3 seeds (a few minutes on a 2-core CPU)."
        ),
        formatter_class=argparse.HelpFormatter,
    )
    d = DEFAULTS
    g = p.add_argument_group("methods and quantizer")
    g.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated names or 'all' ({', '.join(ALL_METHODS)}) [default: {d['methods']}]",
    )
    g.add_argument("--bits", type=int, default=None, help=f"bits per coordinate, 1..8 [default: {d['bits']}]")
    g.add_argument(
        "--bucket-size", type=int, default=None, help=f"coordinates per bucket [default: {d['bucket_size']}]"
    )
    g.add_argument(
        "--clip",
        default=None,
        help="clip normalized coordinates at C std devs: a number, 'none', or 'auto' (2.5 for trn only) [default: auto]",
    )
    g.add_argument(
        "--update-steps",
        default=None,
        help=f"comma-separated steps with a level update [default: {d['update_steps']}; paper: 0,100,2000]",
    )
    g.add_argument(
        "--update-every",
        type=int,
        default=None,
        help=f"then update every N steps (0: never) [default: {d['update_every']}; paper: 10000]",
    )
    g.add_argument(
        "--update-method",
        choices=("exact", "gd"),
        default=None,
        help="ALQ/AMQ optimizer: closed-form 'exact' or the paper's 'gd' [default: exact]",
    )
    g.add_argument("--dist-num", type=int, default=None, help="buckets kept by the norm-based statistics [default: 50]")
    g.add_argument(
        "--exact-1d",
        action="store_true",
        default=None,
        help="send 1-D tensors (biases, BatchNorm weights/biases) exactly in fp32 (32 bits each), quantize the rest; "
        "methods are labelled e.g. 'alq+1d' (simulated workers only)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--workers",
        "-K",
        type=int,
        default=None,
        help=f"simulated workers K (ignored under torchrun: K = WORLD_SIZE) [default: {d['workers']}]",
    )
    g.add_argument("--seeds", default=None, help=f"comma-separated seeds [default: {d['seeds']}]")
    g.add_argument("--steps", type=int, default=None, help=f"training steps [default: {d['steps']}]")
    g.add_argument(
        "--epochs", type=float, default=None, help="training length in epochs of the training set (overrides --steps)"
    )
    g.add_argument("--lr", type=float, default=None, help=f"learning rate, x0.1 at each milestone [default: {d['lr']}]")
    g.add_argument(
        "--milestones",
        default=None,
        help="fractions of training where lr is multiplied by 0.1 [default: 0.5,0.75 as 40k/60k of 80k]",
    )
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum [default: {d['momentum']}]")
    g.add_argument("--weight-decay", type=float, default=None, help=f"weight decay [default: {d['weight_decay']}]")
    g.add_argument("--batch-size", type=int, default=None, help=f"mini-batch per worker [default: {d['batch_size']}]")
    g.add_argument(
        "--model",
        default=None,
        help="mlp, mlp-<width>, resnet8/20/32/44/56/110 (CIFAR, option A), resnet18/50 (torchvision) [default: mlp]",
    )
    g.add_argument(
        "--data",
        choices=DATA_NAMES,
        default=None,
        help="digits (built in), cifar10 (needs --data-dir), synthetic (CIFAR-shaped) [default: digits]",
    )
    g.add_argument("--data-dir", default=None, help="directory of CIFAR-10's python batches (cifar-10-batches-py)")
    g.add_argument(
        "--synthetic-size", type=int, default=None, help="training examples of --data synthetic [default: 10000]"
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available else cpu]")
    g.add_argument(
        "--workers-mode",
        choices=WORKERS_MODES,
        default="auto",
        help="how the K worker gradients are computed: one vmapped pass ('batched'; per-worker BatchNorm "
        "statistics) or K passes ('sequential', the reference); 'auto' batches MLPs, and BatchNorm models on CUDA "
        "[default: auto]",
    )
    g.add_argument(
        "--amp", choices=AMP_MODES, default=None, help="bfloat16 autocast of the forward passes [default: none]"
    )
    g.add_argument(
        "--channels-last", action="store_true", default=None, help="channels-last memory format (image models)"
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the paper's settings (SPEC section 10); explicit flags override",
    )
    g = p.add_argument_group("under torchrun")
    g.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="shard the model with FSDP2 (every parameter-owning layer or block, then the root) instead of DDP; "
        "ALQ quantizes FSDP's reduce-scatter. The quantization variance is measured on each rank's own payloads; "
        "bits per step are the bytes a rank sent in the last step. Needs torchrun; --exact-1d, --amp and --channels-last are not "
        "supported",
    )
    g.add_argument(
        "--shard-size",
        type=int,
        default=None,
        metavar="N",
        help="with --fsdp: ranks per FSDP shard group, e.g. the GPUs per node; must divide WORLD_SIZE. N < WORLD_SIZE "
        "is hybrid sharding: FSDP's exact reduce-scatter within a group, ALQ's quantized all-reduce across the "
        "groups (bits per step count only that traffic) [default: WORLD_SIZE, plain FSDP]",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory [default: ./runs/<data>-<model>-b<bits>-K<K>-<time>]")
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue the comparison in DIR (or --out) from its checkpoints, with its saved settings",
    )
    g.add_argument(
        "--eval-every", type=int, default=None, help="validation every N steps [default: ~20 points per run]"
    )
    g.add_argument(
        "--log-every",
        type=int,
        default=None,
        help="log the quantization variance every N steps [default: ~40 points per run]",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="checkpoint every N steps (a final checkpoint is always written) [default: 0]",
    )
    g.add_argument(
        "--stop-at", type=int, default=None, help="stop every run after this step and checkpoint it (to test --resume)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _device(name: str | None) -> torch.device:
    if name:
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                f"alq-train: error: --device {name} asked for CUDA but torch sees no GPU; use --device cpu"
            )
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_out(s: dict[str, Any], workers: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{s['data']}-{s['model']}-b{s['bits']}-d{s['bucket_size']}-K{workers}-{stamp}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alq-train`` and ``python -m alq_torch.train``."""
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp or args.shard_size is not None:
        try:
            layout_of(bool(args.fsdp), args.shard_size, world)
        except ValueError as exc:
            raise SystemExit(f"alq-train: error: {exc}") from None
    if world > 1:
        under = "torchrun (DDP or --fsdp)"
        if args.amp not in (None, "none") or args.channels_last:
            raise SystemExit(
                "alq-train: error: --amp and --channels-last are only implemented for simulated workers, "
                f"not under {under}; fix: drop them or run without torchrun"
            )
        if args.exact_1d:
            raise SystemExit(
                f"alq-train: error: --exact-1d is only implemented for simulated workers, not under {under}; "
                "fix: run without torchrun (WORLD_SIZE=1) or drop --exact-1d"
            )
        from .ddp import main_ddp

        return main_ddp(args)
    t_start = time.perf_counter()
    resume_dir = None
    if args.resume is not None:
        resume_dir = args.resume or args.out
        if not resume_dir:
            raise SystemExit("alq-train: error: --resume needs a directory: --resume DIR (or --out DIR)")
        cfg_path = os.path.join(resume_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise SystemExit(
                f"alq-train: error: --resume {resume_dir!r}: no config.json there (not an alq-train output directory)"
            )
        with open(cfg_path, encoding="utf-8") as fh:
            s = json.load(fh)
        saved = s.get("layout")
        if isinstance(saved, dict):
            raise SystemExit(
                f"alq-train: error: --resume {resume_dir!r}: its runs were trained under torchrun "
                f"({saved.get('mode')}, {saved.get('world')} ranks), with per-rank checkpoints; this process is not "
                f"under torchrun (WORLD_SIZE=1); fix: torchrun ... (WORLD_SIZE={saved.get('world')}) -m "
                "alq_torch.train --resume DIR"
            )
        print(f"resuming {resume_dir} with its saved settings")
    else:
        s = resolve(args)
    device = _device(args.device)
    try:
        data = load_data(s["data"], data_dir=s.get("data_dir"), synthetic_size=int(s["synthetic_size"])).to(device)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"alq-train: error: {exc}") from None
    workers = int(s["workers"])
    n_train = int(data.y_train.shape[0])
    steps = resolve_steps(s, n_train, workers)
    s["resolved_steps"] = steps
    out = resume_dir or args.out or _default_out(s, workers)
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    if resume_dir is None:
        write_json(os.path.join(out, "config.json"), s)
    progress = not args.no_progress
    print(
        f"alq-train: {len(s['methods'])} methods x {len(s['seeds'])} seeds, {s['bits']} bits, bucket {s['bucket_size']}, "
        + ("1-D tensors exact, " if s.get("exact_1d") else "")
        + f"K={workers}, {steps} steps, batch {s['batch_size']}/worker, model {s['model']} on {s['data']} "
        f"({n_train} train / {int(data.y_val.shape[0])} val), device {device}; output -> {out}",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    stopped = False
    for seed in s["seeds"]:
        for method in s["methods"]:
            run = run_config(s, method, seed, steps, workers)
            res_path = os.path.join(out, "runs", f"{method}-s{seed}.json")
            ck_path = os.path.join(out, "checkpoints", f"{method}-s{seed}.pt")
            if resume_dir is not None and os.path.isfile(res_path):
                with open(res_path, encoding="utf-8") as fh:
                    results.append(json.load(fh))
                continue
            res, _, _ = train_run(
                run,
                data,
                device=device,
                checkpoint=ck_path,
                resume=resume_dir is not None,
                stop_at=args.stop_at,
                progress=progress,
                desc=f"{method:>7} seed {seed}",
                workers_mode=args.workers_mode,
                amp=str(s.get("amp", "none")),
                channels_last=bool(s.get("channels_last", False)),
            )
            if res is None:
                stopped = True
                continue
            d = res.to_dict()
            write_json(res_path, d)
            results.append(d)
            if not progress:
                print(
                    f"  {method:>7} seed {seed}: val acc {res.final_val_acc:.4f}, qvar {res.final_variance:.3g}",
                    flush=True,
                )
    if stopped:
        print(f"stopped at step {args.stop_at}; continue with: alq-train --resume {out}")
        return 0
    same = same_gradient_variance(s, out, data, device, steps, workers)
    rows = summarize(results, same)
    title = f"{s['data']}, {s['model']}, {s['bits']} bits, bucket {s['bucket_size']}, K={workers}, {steps} steps"
    table = format_table(rows, title=title)
    wall = time.perf_counter() - t_start
    print()
    print(table)
    payload = {
        "settings": s,
        "device": str(device),
        "versions": versions(),
        "num_params": results[0]["num_params"] if results else None,
        "summary": rows,
        "same_gradient_variance": same,
        "runs": results,
        "wall_seconds": wall,
        "table": table,
    }
    write_json(os.path.join(out, "results.json"), payload)
    write_csv(os.path.join(out, "results.csv"), rows)
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    plots = [] if args.no_plots else plot_all(results, out, title=title)
    print(
        f"\nwall time {wall:.1f} s; results in {os.path.abspath(out)}: results.json, results.csv, table.txt"
        + (", " + ", ".join(os.path.basename(p) for p in plots) if plots else "")
    )
    return 0


def same_gradient_variance(
    s: dict[str, Any], out: str, data: Any, device: torch.device, steps: int, workers: int
) -> dict[str, list[float]]:
    """Every method's final levels on the same worker gradients, per seed.

    The probe gradients are K worker gradients of the final model of the first
    method's run (``fp32`` in the default order) on fixed mini-batches.
    """
    from .._simulate import SimulatedWorkers, exact_mask_from_params
    from .loop import _load_checkpoint, make_quantizer
    from .models import build_model
    from .report import label

    exact_1d = bool(s.get("exact_1d", False))
    same: dict[str, list[float]] = {label({"method": m, "exact_1d": exact_1d}): [] for m in s["methods"]}
    for seed in s["seeds"]:
        first = os.path.join(out, "checkpoints", f"{s['methods'][0]}-s{seed}.pt")
        if not os.path.isfile(first):
            continue
        model = build_model(s["model"], data.input_shape, data.num_classes).to(device)
        model.load_state_dict(_load_checkpoint(first)["model"])
        grads = probe_gradients(model, data, workers, int(s["batch_size"]), int(seed), device)
        for method in s["methods"]:
            ck = os.path.join(out, "checkpoints", f"{method}-s{seed}.pt")
            if not os.path.isfile(ck):
                continue
            run = run_config(s, method, seed, steps, workers)
            exact = exact_mask_from_params([p for p in model.parameters() if p.requires_grad]) if exact_1d else None
            sim = SimulatedWorkers(
                run.quantizer_config(),
                quantizer=make_quantizer(run),
                device=device,
                seed=40_000 + seed,
                exact_mask=exact,
            )
            sim.quantizer.load_state_dict(_load_checkpoint(ck)["sim"]["quantizer"])
            var = sim.variance(grads, repeats=4) if run.quantizer_config().quantized else 0.0
            same[label({"method": method, "exact_1d": exact_1d})].append(var)
    return same


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
