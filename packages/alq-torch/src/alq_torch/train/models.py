"""Models of the harness: CIFAR ResNets (option-A shortcuts), a small MLP, torchvision ResNets.

The CIFAR ResNets follow He et al. (2016), section 4.2: depth ``6n + 2``, three
stages of ``n`` basic blocks with 16, 32 and 64 channels, and parameter-free
"option A" shortcuts (stride-2 subsampling plus zero channel padding), as the
ALQ paper trained them.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

#: Depths of the CIFAR ResNets offered by name (``resnet8`` ... ``resnet110``).
CIFAR_RESNET_DEPTHS = (8, 20, 32, 44, 56, 110)

#: Names accepted by :func:`build_model` (``mlp-<width>`` also works).
MODEL_NAMES = ("mlp", *(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS), "resnet18", "resnet50")


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and pad the new channels with zeros."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = _ShortcutA(cout - cin) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3x32x32 images.

    Parameters
    ----------
    depth : int
        8, 20, 32, 44, 56, 110 or any ``6n + 2``.
    num_classes : int
    in_channels : int
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            msg = f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, 56, 110); got {depth}"
            raise ValueError(msg)
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = out.mean(dim=(2, 3))  # global average pool; vmap-friendly (no as_strided_ fallback)
        logits: Tensor = self.fc(out)
        return logits


class MLP(nn.Module):
    """Two hidden ReLU layers of ``width`` units on the flattened input."""

    def __init__(self, in_features: int, num_classes: int, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a model by name for inputs of ``input_shape`` (without the batch dimension).

    Parameters
    ----------
    name : str
        ``mlp``, ``mlp-<width>``, ``resnet8/20/32/44/56/110`` (CIFAR, option A),
        or ``resnet18``/``resnet50`` (torchvision, needs ``pip install torchvision``).
    input_shape : tuple of int
        ``(64,)`` for digits, ``(3, 32, 32)`` for CIFAR-shaped images.
    num_classes : int
    """
    if not isinstance(name, str):
        msg = f"`model` must be a string; got {type(name).__name__}"
        raise TypeError(msg)
    key = name.lower()
    m = re.fullmatch(r"mlp(?:-(\d+))?", key)
    if m:
        width = int(m.group(1)) if m.group(1) else 128
        if width < 1:
            msg = f"MLP width must be positive; got {name!r}"
            raise ValueError(msg)
        features = 1
        for s in input_shape:
            features *= s
        return MLP(features, num_classes, width)
    m = re.fullmatch(r"resnet(\d+)", key)
    if m is None:
        msg = f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)} or mlp-<width>"
        raise ValueError(msg)
    depth = int(m.group(1))
    if len(input_shape) != 3:
        msg = (
            f"model {name!r} needs image inputs (channels, height, width); the data has shape "
            f"{tuple(input_shape)}. Use --model mlp for the digits data, or --data cifar10/synthetic"
        )
        raise ValueError(msg)
    if depth in (18, 50):
        try:
            import torchvision
        except ImportError as exc:
            msg = f"model {name!r} needs torchvision; fix: pip install 'alq-torch[vision]'"
            raise ImportError(msg) from exc
        ctor = torchvision.models.resnet18 if depth == 18 else torchvision.models.resnet50
        net: nn.Module = ctor(num_classes=num_classes)
        if input_shape[0] != 3:
            msg = f"torchvision {name} expects 3 input channels; got {input_shape[0]}"
            raise ValueError(msg)
        return net
    return CifarResNet(depth, num_classes, in_channels=input_shape[0])


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the length of the flat gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["CIFAR_RESNET_DEPTHS", "MODEL_NAMES", "CifarResNet", "MLP", "build_model", "num_parameters"]
