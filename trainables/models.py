"""Classifiers: MNIST-1D's 1-D CNN, a small CNN for 8x8 and 28x28 images, the CIFAR nets of the
SWA paper's tables, and a small fast CIFAR net after airbench.

torchvision's ResNet-18 and VGG16-BN with CIFAR heads; compact PreResNet-110/164 and WRN-28-10 after
the SWA reference code (timgaripov/swa/models), which torchvision does not have.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from flatbasin.trainables import usercode

ModelName = Literal[
    "auto", "cnn1d", "small_cnn", "resnet18", "vgg16_bn", "preresnet110", "preresnet164", "wrn28_10",
    "airbench",
]  # fmt: skip
BUILT_IN_MODELS: tuple[str, ...] = get_args(ModelName)
ZOOS = ("torchvision", "timm")  # `torchvision:resnet50`, `timm:resnet18`: a zoo's architecture
Init = Literal["default", "kaiming", "xavier"]


def model_kind(name: str) -> Literal["built_in", "zoo", "user"]:
    """What a `model` setting names: one of ours, a zoo's architecture, or the user's callable."""
    if name in BUILT_IN_MODELS:
        return "built_in"
    if name.partition(":")[0] in ZOOS:
        return "zoo"
    return "user"


def check_model_name(name: str) -> str:
    """A `model` setting's form (not whether it exists: that needs the import, done before Ray)."""
    zoo, sep, arch = name.partition(":")
    if (
        name in BUILT_IN_MODELS
        or (sep and zoo in ZOOS and arch.strip())
        or usercode.parse_ref(name)
    ):
        return name
    raise ValueError(
        f"unknown model {name!r}; give a built-in one ({', '.join(BUILT_IN_MODELS)}), a zoo's "
        "(torchvision:resnet50, timm:resnet18) or your own as module:callable (mynet:build)"
    )


class CNN1d(nn.Module):
    """The MNIST-1D paper's CNN (Greydanus 2020, ConvBase): three stride-2 convolutions of 25 channels
    (kernels 5, 3, 3; padding 1) and a linear head on the flattened features, here with batch norm
    after each convolution (what the averaging methods' BN pass is for). 40 samples -> 25 x 5 -> 10."""

    def __init__(
        self, in_channels: int, length: int, num_classes: int, dropout: float = 0.0, width: int = 25
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for kernel in (5, 3, 3):
            layers += [
                nn.Conv1d(c_in, width, kernel, stride=2, padding=1, bias=False),
                nn.BatchNorm1d(width),
                nn.ReLU(inplace=True),
            ]
            c_in, length = width, (length + 2 - kernel) // 2 + 1
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width * length, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head; size-agnostic thanks to global average pooling."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class AirbenchNet(nn.Module):
    """A small fast CIFAR net after Keller Jordan's airbench94 (about 2M parameters): a conv stem,
    then three groups of conv, max-pool, BN, GELU, conv, BN, GELU at widths 64, 256, 256, a global
    max-pool and a linear head. Convolutions start as identities on their first input channels
    (dirac), as airbench's do. Only the architecture is airbench's; its training recipe (whitened
    frozen stem, label smoothing, Lookahead, TTA on by default) is not part of it."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dropout: float = 0.0,
        widths: tuple[int, int, int] = (64, 256, 256),
        stem_width: int = 24,  # airbench's 2x2 whitening stem has 2 * 3 * 2**2 = 24 channels
    ):
        super().__init__()

        def conv(c_in: int, c_out: int) -> nn.Conv2d:
            layer = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            nn.init.dirac_(layer.weight.data[: min(c_in, c_out)])
            return layer

        def group(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                conv(c_in, c_out), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.GELU(),
                conv(c_out, c_out), nn.BatchNorm2d(c_out), nn.GELU(),
            ]  # fmt: skip

        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, padding=1),
            nn.GELU(),
            *group(stem_width, c1),
            *group(c1, c2),
            *group(c2, c3),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c3, num_classes, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        out = planes * self.expansion
        self.shortcut = (
            nn.Conv2d(c_in, out, 1, stride, bias=False) if stride != 1 or c_in != out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class _PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, out, 1, stride, bias=False) if stride != 1 or c_in != out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + skip


class PreResNet(nn.Module):
    """Pre-activation ResNet for 32x32 (He et al. 2016); depth 110 uses basic blocks, 164 bottlenecks."""

    def __init__(self, depth: int, in_channels: int, num_classes: int):
        super().__init__()
        bottleneck = depth >= 44
        block: type[_PreActBlock] | type[_PreActBottleneck] = (
            _PreActBottleneck if bottleneck else _PreActBlock
        )
        n = (depth - 2) // 9 if bottleneck else (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        c_in = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(block(c_in, planes, stride if i == 0 else 1))
                c_in = planes * block.expansion
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.conv1(x))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out)


class _WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016), as in the SWA paper's WRN-28-10."""

    def __init__(
        self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float = 0.0
    ):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        c_in = widths[0]
        for c_out, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(_WideBlock(c_in, c_out, stride if i == 0 else 1, dropout))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)  # CIFAR stem: no 7x7, no max-pool
    model.maxpool = nn.Identity()
    return model


def _vgg16_bn(in_channels: int, num_classes: int, dropout: float) -> nn.Module:
    from torchvision.models import vgg16_bn

    model = vgg16_bn(num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    model.avgpool = nn.Identity()
    # The SWA paper's CIFAR head: 512 features after five poolings of a 32x32 input.
    model.classifier = nn.Sequential(
        nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(True),
        nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(True),
        nn.Linear(512, num_classes),
    )  # fmt: skip
    return model


def resolve_name(name: str, shape: tuple[int, ...]) -> str:
    """`auto`: cnn1d for 1-D signals (channels, length), small_cnn below 32x32 images, else resnet18."""
    if name != "auto":
        return name
    _check_layout(name, shape)
    if len(shape) == 2:
        return "cnn1d"
    return "small_cnn" if shape[1] < 32 else "resnet18"


def _check_layout(name: str, shape: tuple[int, ...]) -> None:
    """The built-in networks take images (C, H, W) and 1-D signals (C, L), nothing else (feature
    vectors (F,) from the user's arrays or Datasets, say)."""
    if len(shape) not in (2, 3):
        raise ValueError(
            f"model '{name}': the built-in networks take images (channels, height, width) or 1-D "
            f"signals (channels, length); this data set's examples have shape {shape}; give your "
            "own model (model: module:callable)"
        )


def _check_fits(name: str, shape: tuple[int, ...]) -> None:
    _check_layout(name, shape)
    signal = len(shape) == 2
    if name == "cnn1d" and not signal:
        raise ValueError(
            f"model 'cnn1d' needs 1-D signals (channels, length); this data set is images of shape "
            f"{shape} (use small_cnn, or auto)"
        )
    if name != "cnn1d" and signal:
        raise ValueError(
            f"model '{name}' needs 2-D images (channels, height, width); this data set is 1-D signals "
            f"of shape {shape} (use cnn1d, or auto)"
        )
    if name not in ("cnn1d", "small_cnn") and shape[1] < 32:
        raise ValueError(
            f"model '{name}' needs 32x32 inputs; this data set is {shape[1]}x{shape[2]} (use small_cnn)"
        )


def build_model(
    name: str,
    shape: tuple[int, ...],
    num_classes: int,
    *,
    dropout: float = 0.0,
    init: Init = "default",
    model_args: Mapping[str, Any] | None = None,
    code_dir: str | Path | None = None,
) -> nn.Module:
    """`shape` is one example's: (channels, height, width) for images, (channels, length) for signals.
    A zoo's or the user's model gets `model_args` as keyword arguments (the user's is found in
    `code_dir` first); ours take `dropout`."""
    model: nn.Module
    kind = model_kind(name)
    if kind != "built_in":
        model = (
            _zoo_model(name, shape, num_classes, dict(model_args or {}))
            if kind == "zoo"
            else (_user_model(name, shape, num_classes, dict(model_args or {}), code_dir))
        )
        _initialise(model, init)
        return model
    name = resolve_name(name, shape)
    _check_fits(name, shape)
    channels = shape[0]
    if name == "cnn1d":
        model = CNN1d(channels, shape[1], num_classes, dropout)
    elif name == "small_cnn":
        model = SmallCNN(channels, num_classes, dropout)
    elif name == "resnet18":
        model = _resnet18(channels, num_classes)
    elif name == "vgg16_bn":
        model = _vgg16_bn(channels, num_classes, dropout)
    elif name == "airbench":
        model = AirbenchNet(channels, num_classes, dropout)
    elif name == "preresnet110":
        model = PreResNet(110, channels, num_classes)
    elif name == "preresnet164":
        model = PreResNet(164, channels, num_classes)
    else:
        model = WideResNet(28, 10, channels, num_classes, dropout)
    _initialise(model, init)
    return model


def _user_model(
    name: str, shape: tuple[int, ...], num_classes: int, args: dict[str, Any], code_dir: Any
) -> nn.Module:
    """`build(input_shape, num_classes, **model_args)` from the user's module."""
    ref = usercode.parse_ref(name)
    assert ref is not None  # check_model_name let it through
    what = f"model {name}"
    build = usercode.load_callable(ref, code_dir, what)
    usercode.check_kwargs(build, args, 2, f"{what}: model_args")
    model = usercode.call_user(build, what, tuple(shape), num_classes, **args)
    if not isinstance(model, nn.Module):
        raise usercode.UserCodeError(
            f"{what} returned {usercode.a_type(model)}, not a torch.nn.Module; build(input_shape, "
            "num_classes, **model_args) must return the network"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise usercode.UserCodeError(f"{what} returned a module without trainable parameters")
    return model


def _zoo_model(
    name: str, shape: tuple[int, ...], num_classes: int, args: dict[str, Any]
) -> nn.Module:
    """A torchvision or timm architecture built for the data's channels and classes. Pretrained
    weights are the zoo's business (`model_args: {pretrained: true}` for timm, `weights: DEFAULT`
    for torchvision): nothing here fetches anything unless asked."""
    zoo, _, arch = name.partition(":")
    arch = arch.strip()
    if len(shape) != 3:
        raise ValueError(
            f"model '{name}' is an image model (channels, height, width); this data set is of shape "
            f"{shape}: give your own model as module:callable"
        )
    if zoo == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(
                f"model '{name}' needs timm, which is not installed; install it with "
                'pip install "flatbasin[timm]" (or pip install timm)'
            ) from None
        if not timm.is_model(arch):
            near = difflib.get_close_matches(arch, timm.list_models(), n=8, cutoff=0.75)
            raise ValueError(
                f"model {name}: timm has no model '{arch}'"
                + (f"; similar: {', '.join(near)}" if near else "; see timm.list_models()")
            )
        return usercode.call_user(
            timm.create_model, f"model {name}", arch,
            num_classes=num_classes, in_chans=shape[0], **args,
        )  # fmt: skip
    from torchvision import models as tv

    if arch not in tv.list_models():
        near = difflib.get_close_matches(arch.lower(), tv.list_models(), n=8, cutoff=0.75)
        raise ValueError(
            f"model {name}: torchvision has no model builder '{arch}'"
            + (
                f"; similar: {', '.join(near)}"
                if near
                else "; see torchvision.models.list_models()"
            )
        )
    model = usercode.call_user(tv.get_model, f"model {name}", arch, num_classes=num_classes, **args)
    if shape[0] != 3:
        _first_conv_takes(model, shape[0])
    return model


def _pair(sizes: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (height, width) setting, which torch types as any length."""
    height, width = sizes
    return height, width


def _first_conv_takes(model: nn.Module, channels: int) -> None:
    """torchvision's builders make 3-channel stems: give the first convolution `channels` inputs
    (same kernel, stride and padding; freshly initialised)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                padding = child.padding if isinstance(child.padding, str) else _pair(child.padding)
                setattr(parent, child_name, nn.Conv2d(
                    channels, child.out_channels, _pair(child.kernel_size), _pair(child.stride),
                    padding, _pair(child.dilation), child.groups, child.bias is not None,
                    child.padding_mode,
                ))  # fmt: skip
                return


def _initialise(model: nn.Module, init: Init) -> None:
    if init == "default":
        return
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
