"""Image classifiers: the 2-conv + 2-FC MNIST CNN, LeNet-5, ResNet-18 (CIFAR variant), and torchvision's
ResNet-50 / EfficientNet-B0 for the GPU suites.

Every model takes uint8 (or float in [0, 255]) images ``N x C x H x W`` and normalises them itself
(:class:`ImageInput`), so task splits stay uint8 (4x less memory) and a deployed model needs no separate
preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metalr.tasks.models import ACTIVATIONS, mlp


class ImageInput(nn.Module):
    """Scale to [0, 1] and standardise per channel with the training split's statistics (buffers)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def of(cls, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ImageInput:
        """The input layer of a ``channels``-channel model: the given statistics, 0.5 / 0.5 where omitted."""
        return cls(mean or [0.5] * channels, std or [0.5] * channels)

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(self.mean.dtype) / 255.0 - self.mean) / self.std


def _check_image(in_channels: int, image_size: int, num_classes: int) -> None:
    if in_channels <= 0 or image_size < 8 or num_classes < 2:
        raise ValueError(
            f"need in_channels >= 1, image_size >= 8, num_classes >= 2; got {in_channels=}, {image_size=}, {num_classes=}"
        )


def cnn2(
    in_channels: int,
    num_classes: int,
    image_size: int = 28,
    channels: tuple[int, int] = (32, 64),
    hidden: int = 128,
    dropout: float = 0.0,
    activation: str = "relu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """Two 5x5 conv layers with 2x2 max-pooling, then two fully connected layers (the classic MNIST
    CNN of the TensorFlow tutorial, ~99.2% with 32/64 channels and 1024 hidden units)."""
    _check_image(in_channels, image_size, num_classes)
    act = ACTIVATIONS[activation]
    flat = channels[1] * (image_size // 4) ** 2
    return nn.Sequential(
        ImageInput.of(in_channels, mean, std),
        nn.Conv2d(in_channels, channels[0], 5, padding=2),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 5, padding=2),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        act(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def image_mlp(
    in_channels: int,
    num_classes: int,
    image_size: int = 28,
    width: int = 128,
    depth: int = 2,
    activation: str = "relu",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """A fully connected net on the standardised, flattened pixels (the classic MNIST MLP; ~98% at 2 x 256).

    The cheapest real-image model here, and one that ``torch.func.vmap`` batches well: meta-training
    populations of it cost a fraction of the CNNs'."""
    _check_image(in_channels, image_size, num_classes)
    return nn.Sequential(
        ImageInput.of(in_channels, mean, std),
        nn.Flatten(),
        mlp(in_channels * image_size**2, num_classes, width, depth, activation),
    )


def lenet5(
    in_channels: int,
    num_classes: int,
    image_size: int = 28,
    activation: str = "tanh",
    pooling: str = "avg",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998): conv 6@5x5, pool, conv 16@5x5, pool, FC 120, 84, classes.

    28x28 inputs are padded by 2 to the paper's 32x32; ``activation``/``pooling`` choose between the
    original (tanh, average) and the modern (relu, max) variants.
    """
    _check_image(in_channels, image_size, num_classes)
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling=}")
    act = ACTIVATIONS[activation]
    pool = nn.AvgPool2d if pooling == "avg" else nn.MaxPool2d
    padding = 2 if image_size == 28 else 0
    side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
    return nn.Sequential(
        ImageInput.of(in_channels, mean, std),
        nn.Conv2d(in_channels, 6, 5, padding=padding),
        act(),
        pool(2),
        nn.Conv2d(6, 16, 5),
        act(),
        pool(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120),
        act(),
        nn.Linear(120, 84),
        act(),
        nn.Linear(84, num_classes),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with batch norm, identity or 1x1 shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem without max-pooling (Kuang Liu's widely used pytorch-cifar
    variant); ``blocks=(2, 2, 2, 2)`` and ``width=64`` is ResNet-18 (11.2M parameters)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if width <= 0 or not blocks or min(blocks) <= 0:
            raise ValueError(f"width and every stage's block count must be positive, got {width=}, {blocks=}")
        self.input = ImageInput.of(in_channels, mean, std)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        planes = width
        for stage, count in enumerate(blocks):
            out_planes = width * 2**stage
            for index in range(count):
                stages.append(BasicBlock(planes, out_planes, stride=2 if stage > 0 and index == 0 else 1))
                planes = out_planes
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(self.input(x)))
        return self.head(features.mean(dim=(2, 3)))


def resnet18_cifar(
    num_classes: int = 10, in_channels: int = 3, width: int = 64, **kwargs: object
) -> CifarResNet:
    return CifarResNet(num_classes, in_channels, width, (2, 2, 2, 2), **kwargs)  # type: ignore[arg-type]


def torchvision_classifier(
    name: str, num_classes: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> nn.Sequential:
    """``resnet50`` or ``efficientnet_b0`` from torchvision (randomly initialised), behind :class:`ImageInput`.

    Raises:
        ImportError: torchvision is not installed (it is the optional ``vision`` extra).
    """
    factories = ("resnet50", "efficientnet_b0")
    if name not in factories:
        raise ValueError(f"unknown torchvision model {name!r}; expected one of {list(factories)}")
    try:
        import torchvision.models as tv_models
    except ImportError as err:
        raise ImportError(
            f"model {name!r} needs torchvision, which is not importable ({err}); install it with: pip install 'metalr[vision]'"
        ) from None
    net = getattr(tv_models, name)(weights=None, num_classes=num_classes)
    return nn.Sequential(ImageInput.of(3, mean, std), net)
