"""The ALQ training harness: ``alq-train`` / ``python -m alq_torch.train``.

Trains a model with each quantization method side by side, with K simulated
workers on one device (the paper's protocol) or real DDP under ``torchrun``,
and reports accuracy, quantization variance, bits on the wire and overheads.
"""

from .cli import ALL_METHODS, DEFAULTS, PRESETS, build_parser, main
from .data import Dataset, WorkerSampler, load_cifar10, load_data, load_digits_data, make_synthetic
from .loop import RunConfig, RunResult, evaluate, train_run
from .models import MLP, CifarResNet, build_model, num_parameters

__all__ = [
    "ALL_METHODS",
    "CifarResNet",
    "DEFAULTS",
    "Dataset",
    "MLP",
    "PRESETS",
    "RunConfig",
    "RunResult",
    "WorkerSampler",
    "build_model",
    "build_parser",
    "evaluate",
    "load_cifar10",
    "load_data",
    "load_digits_data",
    "main",
    "make_synthetic",
    "num_parameters",
    "train_run",
]
