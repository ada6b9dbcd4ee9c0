"""The model zoo: every network freezebench trains, registered by name in :data:`freezebench.registry.MODELS`.

Usage::

    from freezebench.zoo.models import build_model, list_models

    list_models()            # ['deit_tiny', 'mlp', 'mobilenet_v2', 'resnet18', 'resnet20', ...]
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    model = build_model("resnet18", num_classes=100, in_channels=3, image_size=32, pretrained=True)
    model = build_model("tiny", num_classes=10, in_channels=1, image_size=8, checkpoint="run/last.pt")

Every factory has the signature
``factory(*, num_classes, in_channels=3, image_size=32, pretrained=False) -> nn.Module`` and works for
8x8 (sklearn digits, 1 channel) and 32x32 (CIFAR, 3 channels) inputs; the torchvision models and
``deit_tiny`` also at 224x224. A plug-in package adds a model with the same signature through the
entry-point group ``freezebench.models``.

Small-input adaptations (``image_size <= 64``), the usual ones of the CIFAR literature:

* ``resnet18`` / ``resnet50``: 3x3 stride-1 stem conv, no max-pool;
* ``vgg11_bn``: max-pools that would shrink the map below 1x1 become identities, global average pool and
  a single ``Linear(512, num_classes)`` classifier;
* ``mobilenet_v2``: stride-1 stem conv;
* ``deit_tiny``: a smaller patch (see :func:`deit_patch_size`).

With ``pretrained=True`` none of these apply: the model keeps torchvision's ImageNet stem and classifier
layout at any input size, so every pretrained tensor but the final classifier loads (anything else failing
to load is an error, not a silent re-initialisation); 3-channel inputs only.

Block structure: freezebench's "block" granularity treats the children of ``nn.Sequential`` /
``nn.ModuleList`` containers as blocks, so every model keeps its blocks in such containers (the ResNet
stages, VGG/MobileNet ``features``, the ViT encoder layers, the ``tiny`` and ``mlp`` layers).

Pretrained weights (``pretrained=True``) exist for the torchvision models only. They are read from the
torch hub cache (``torch.hub.get_dir()/checkpoints``); a missing file raises
:class:`~freezebench.errors.FreezebenchError` without touching the network unless the environment variable
``FREEZEBENCH_ALLOW_DOWNLOAD=1`` is set. Tensors whose names and shapes match the adapted architecture are
copied; the rest (replaced stem, head) are skipped and logged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FreezebenchError
from ..registry import MODELS

__all__ = ["build_model", "list_models", "deit_patch_size", "CifarResNet", "BasicBlock"]

logger = logging.getLogger(__name__)

#: image sizes up to this get the small-input adaptations
SMALL_INPUT_MAX = 64
#: set to "1" to let ``pretrained=True`` download missing weights
ALLOW_DOWNLOAD_ENV = "FREEZEBENCH_ALLOW_DOWNLOAD"


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def _kaiming_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Kaiming-normal (fan-out, ReLU) init, zero bias: torchvision's init for its CNNs' convolutions."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise FreezebenchError(
            f"model {name!r} has no pretrained weights (only resnet18, resnet50, vgg11_bn and mobilenet_v2 "
            f"have torchvision ImageNet weights); set pretrained=false or pass a checkpoint"
        )


_ARCHITECTURE_ONLY = contextvars.ContextVar("freezebench_architecture_only", default=False)


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """Within this block ``pretrained=True`` builds the pretrained architecture (the ImageNet stem) without
    loading the weights: for counting FLOPs (``freezebench suite --plan``) on a machine without them."""
    token = _ARCHITECTURE_ONLY.set(True)
    try:
        yield
    finally:
        _ARCHITECTURE_ONLY.reset(token)


def _pretrained_input(tv_name: str, in_channels: int) -> None:
    """With ``pretrained=True`` the model keeps torchvision's ImageNet stem (3 input channels, its strides),
    so every pretrained tensor but the classifier loads; other inputs cannot take that stem."""
    if in_channels != 3:
        raise ConfigError(f"model {tv_name!r} with pretrained=true needs 3-channel images (its ImageNet stem), "
                          f"the data has {in_channels}; use RGB data or pretrained=false")


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier head: the last ``nn.Linear`` in module order (``fc``, ``heads.head``,
    ``classifier.6``). :class:`ConfigError` when the model has none."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier head to re-initialise")
    return names[-1]


def _load_pretrained(model: nn.Module, tv_name: str) -> None:
    """Copy torchvision's DEFAULT ImageNet weights for ``tv_name`` into ``model`` where names and shapes match.

    Reads the torch hub cache only, unless ``FREEZEBENCH_ALLOW_DOWNLOAD=1`` allows a download.
    """
    if _ARCHITECTURE_ONLY.get():
        return
    import torchvision  # here, not at the top: `import torchvision` is slow and the CIFAR nets need none
    weights = torchvision.models.get_model_weights(tv_name).DEFAULT
    hub_dir = torch.hub.get_dir()
    cached = os.path.join(hub_dir, "checkpoints", os.path.basename(urlparse(weights.url).path))
    allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"
    where = (
        f"torch expects the file at {cached} (torch.hub.get_dir() = {hub_dir}; set TORCH_HOME to move it); "
        f"download it from {weights.url} on a machine with internet access and copy it there"
    )
    if not os.path.isfile(cached) and not allow_download:
        raise FreezebenchError(
            f"pretrained weights for {tv_name!r} ({weights}) are not in the local torch hub cache: {where}, "
            f"or set {ALLOW_DOWNLOAD_ENV}=1 to let freezebench download them"
        )
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # network errors, corrupt file, hash mismatch, ...
        raise FreezebenchError(
            f"could not load pretrained weights for {tv_name!r} ({weights}): {e}. This machine may be offline; "
            f"{where}"
        ) from e

    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(matched))
    not_loaded = sorted(set(own) - set(matched))
    model.load_state_dict(matched, strict=False)
    logger.info("%s: loaded %d/%d pretrained tensors from %s", tv_name, len(matched), len(own), weights)
    if skipped:
        logger.info("%s: skipped pretrained tensors (name or shape differs): %s", tv_name, ", ".join(skipped))
    if not_loaded:
        logger.info("%s: tensors left at their initial values: %s", tv_name, ", ".join(not_loaded))
    head = head_name(model) + "."
    stem_or_body = [k for k in not_loaded if not k.startswith(head)]
    if stem_or_body:  # only the classifier may stay new: anything else is not "fine-tuning a pretrained model"
        more = f", ... ({len(stem_or_body)} in all)" if len(stem_or_body) > 4 else ""
        raise FreezebenchError(f"pretrained {tv_name} weights do not fit this model's {', '.join(stem_or_body[:4])}"
                               f"{more}: only the classifier head may differ")


# --------------------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, section 4.2)
# --------------------------------------------------------------------------------------------------------


class _PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling by ``stride`` and zero-padding of the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity (or option-A) shortcut, ReLU after the addition."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            _PadShortcut(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2.

    A 3x3 conv (16 channels) + BN + ReLU stem, three stages (``layer1``..``layer3``, each an
    ``nn.Sequential`` of ``n`` :class:`BasicBlock`) with 16, 32 and 64 channels, the first block of stages
    2 and 3 downsampling by stride 2 with option-A (parameter-free) shortcuts, global average pooling and a
    linear classifier; depth = 6n + 2. Convolutions get Kaiming-normal init (He et al. 2015).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _kaiming_conv(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("resnet20")
def resnet20(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """ResNet-20 (n=3, 0.27M parameters) of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016."""
    _no_pretrained("resnet20", pretrained)
    return CifarResNet(20, num_classes, in_channels)


@MODELS.register("resnet32")
def resnet32(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """ResNet-32 (n=5, 0.46M parameters) of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016."""
    _no_pretrained("resnet32", pretrained)
    return CifarResNet(32, num_classes, in_channels)


@MODELS.register("resnet56")
def resnet56(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """ResNet-56 (n=9, 0.85M parameters) of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016."""
    _no_pretrained("resnet56", pretrained)
    return CifarResNet(56, num_classes, in_channels)


# --------------------------------------------------------------------------------------------------------
# torchvision models
# --------------------------------------------------------------------------------------------------------


def _torchvision_resnet(
    tv_name: str, *, num_classes: int, in_channels: int, image_size: int, pretrained: bool
) -> nn.Module:
    import torchvision  # here, not at the top: `import torchvision` is slow and the CIFAR nets need none
    model = getattr(torchvision.models, tv_name)(weights=None, num_classes=num_classes)
    if pretrained:  # the ImageNet stem, so that the pretrained weights load whole (conv1 included)
        _pretrained_input(tv_name, in_channels)
    elif image_size <= SMALL_INPUT_MAX:
        model.conv1 = _kaiming_conv(nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False))
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _kaiming_conv(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False))
    if pretrained:
        _load_pretrained(model, tv_name)
    return model


@MODELS.register("resnet18")
def resnet18(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

    For ``image_size <= 64`` the 7x7 stride-2 stem and its max-pool become a 3x3 stride-1 conv and an identity.
    """
    return _torchvision_resnet(
        "resnet18", num_classes=num_classes, in_channels=in_channels, image_size=image_size, pretrained=pretrained
    )


@MODELS.register("resnet50")
def resnet50(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

    For ``image_size <= 64`` the 7x7 stride-2 stem and its max-pool become a 3x3 stride-1 conv and an identity.
    """
    return _torchvision_resnet(
        "resnet50", num_classes=num_classes, in_channels=in_channels, image_size=image_size, pretrained=pretrained
    )


@MODELS.register("vgg11_bn")
def vgg11_bn(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """torchvision's VGG-11 with batch norm (Simonyan & Zisserman, "Very Deep Convolutional Networks for
    Large-Scale Image Recognition", ICLR 2015; BN by Ioffe & Szegedy 2015).

    Max-pools that would shrink the feature map below 1x1 become identities. For ``image_size <= 64`` the
    classifier is the usual CIFAR one: global average pool and ``Linear(512, num_classes)``; larger inputs keep
    torchvision's 7x7 pool and three-layer classifier.
    """
    # Built on the meta device and initialised once at the end: torchvision's constructor would allocate and
    # initialise the 102M-parameter 7x7 classifier even where it is replaced (seconds of CPU time).
    import torchvision  # here, not at the top: `import torchvision` is slow and the CIFAR nets need none

    with torch.device("meta"):
        model = torchvision.models.vgg11_bn(weights=None, num_classes=num_classes, init_weights=False)
        first = model.features[0]
        if in_channels != first.in_channels:
            model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
        if pretrained:
            _pretrained_input("vgg11_bn", in_channels)
        size = image_size
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.MaxPool2d):
                if size < 2:  # pooling a 1x1 map would leave nothing
                    model.features[i] = nn.Identity()
                else:
                    size //= 2
        if image_size <= SMALL_INPUT_MAX and not pretrained:  # pretrained: ImageNet's classifier, loaded
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = nn.Linear(512, num_classes)
    model.to_empty(device="cpu")
    for m in model.modules():  # torchvision's VGG init
        if isinstance(m, nn.Conv2d):
            _kaiming_conv(m)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()  # weight 1, bias 0, running statistics reset
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    if pretrained:
        _load_pretrained(model, "vgg11_bn")
    return model


@MODELS.register("mobilenet_v2")
def mobilenet_v2(
    *, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False
) -> nn.Module:
    """torchvision's MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    CVPR 2018).

    For ``image_size <= 64`` the stem conv has stride 1 (the common CIFAR adaptation).
    """
    import torchvision  # here, not at the top: `import torchvision` is slow and the CIFAR nets need none
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    stem: nn.Conv2d = model.features[0][0]
    if pretrained:
        _pretrained_input("mobilenet_v2", in_channels)
    stride = 1 if image_size <= SMALL_INPUT_MAX and not pretrained else 2
    if in_channels != stem.in_channels or stride != stem.stride[0]:
        model.features[0][0] = _kaiming_conv(
            nn.Conv2d(in_channels, stem.out_channels, 3, stride=stride, padding=1, bias=False)
        )
    if pretrained:
        _load_pretrained(model, "mobilenet_v2")
    return model


def deit_patch_size(image_size: int) -> int:
    """The ViT patch size used by ``deit_tiny`` for ``image_size``.

    16 (DeiT's own) from 224 pixels up; below, ``image_size // 8`` so that the image is an 8x8 grid of
    patches (32 -> 4, 64 -> 8, 8 -> 1) -- in both cases lowered to the largest divisor of ``image_size``
    so the patches tile the image (28 -> 2, 300 -> 15).
    """
    target = 16 if image_size >= 224 else max(1, image_size // 8)
    return next(p for p in range(min(target, image_size), 0, -1) if image_size % p == 0)


@MODELS.register("deit_tiny")
def deit_tiny(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """DeiT-Tiny (Touvron et al., "Training data-efficient image transformers & distillation through
    attention", ICML 2021) as a torchvision ``VisionTransformer`` (Dosovitskiy et al., ICLR 2021): hidden size
    192, 12 layers, 3 heads, MLP size 768, patch size :func:`deit_patch_size`; no distillation token.
    """
    _no_pretrained("deit_tiny", pretrained)
    patch = deit_patch_size(image_size)
    import torchvision  # here, not at the top: `import torchvision` is slow and the CIFAR nets need none
    model = torchvision.models.VisionTransformer(
        image_size=image_size,
        patch_size=patch,
        num_layers=12,
        num_heads=3,
        hidden_dim=192,
        mlp_dim=768,
        num_classes=num_classes,
    )
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, 192, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / (in_channels * patch * patch)))
        nn.init.zeros_(model.conv_proj.bias)  # same init as torchvision's VisionTransformer
    return model


# --------------------------------------------------------------------------------------------------------
# test models
# --------------------------------------------------------------------------------------------------------


@MODELS.register("tiny")
def tiny(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """A two-conv CNN for tests and smoke runs (conv-BN-ReLU blocks after LeCun et al. 1998 and Ioffe &
    Szegedy, "Batch Normalization", ICML 2015): 8 and 16 channels, global average pool, linear head.
    """
    _no_pretrained("tiny", pretrained)
    return nn.Sequential(
        OrderedDict(
            block1=nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)),
            block2=nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(16, num_classes),
        )
    )


@MODELS.register("mlp")
def mlp(*, num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
    """A multilayer perceptron for tests (Rumelhart, Hinton & Williams, "Learning representations by
    back-propagating errors", Nature 1986): flatten, 64 and 32 hidden ReLU units, linear head.
    """
    _no_pretrained("mlp", pretrained)
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(in_channels * image_size * image_size, 64),
            relu1=nn.ReLU(),
            fc2=nn.Linear(64, 32),
            relu2=nn.ReLU(),
            fc3=nn.Linear(32, num_classes),
        )
    )


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """The names of all registered models (built-in and plug-ins), sorted."""
    return MODELS.names()


def load_checkpoint(model: nn.Module, name: str, path: str, reinit_head: bool = False) -> None:
    """Load a freezebench checkpoint or a state dict into ``model``; ``reinit_head``: all but the classifier head
    (:func:`head_name`), which keeps its fresh initialisation (a new task's head). The rest must fit exactly."""
    _load_checkpoint(model, name, os.fspath(path), reinit_head)


def _load_checkpoint(model: nn.Module, name: str, path: str, reinit_head: bool = False) -> None:
    if not os.path.isfile(path):
        raise FreezebenchError(f"model checkpoint {path!r} does not exist (or is not a file)")
    from ..fileio import read_torch

    obj = read_torch(path, what="model checkpoint", error=FreezebenchError,  # CRC32-checked
                     fix="the file is corrupt or truncated: pass another model.checkpoint")

    saved_name = None
    if isinstance(obj, Mapping) and "model_state" in obj:
        saved_name = obj.get("model_name")
        state = obj["model_state"]
    else:
        state = obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FreezebenchError(
            f"model checkpoint {path!r} is neither a state dict nor a freezebench checkpoint "
            f"(a dict with key 'model_state')"
        )

    own = model.state_dict()
    head = head_name(model) + "."
    if reinit_head:  # a new head: neither loaded nor compared
        own = {k: v for k, v in own.items() if not k.startswith(head)}
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    else:
        heads = [k for k in own if k.startswith(head) and k in state and state[k].shape != own[k].shape]
        if heads and all(state[k].shape[1:] == own[k].shape[1:] for k in heads):
            k = heads[0]
            raise FreezebenchError(
                f"model checkpoint {path!r} has a head of {state[k].shape[0]} outputs ({k}), the model "
                f"{own[k].shape[0]}: set model.reinit_head=true to fine-tune with a new head")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if saved_name is not None and saved_name != name:
            parts.append(f"it was saved from model {saved_name!r}, not {name!r}")
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape))
        for label, keys in problems:
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise FreezebenchError(f"model checkpoint {path!r} does not fit model {name!r}: " + "; ".join(parts))
    model.load_state_dict(state, strict=not reinit_head)
    logger.info("loaded model weights for %r from %s%s", name, path, " (new head)" if reinit_head else "")


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    pretrained: bool = False,
    checkpoint: str | None = None,
    reinit_head: bool = False,
) -> nn.Module:
    """Build the registered model ``name`` and optionally load weights.

    ``pretrained`` loads torchvision's ImageNet weights where they fit (see the module docstring);
    ``checkpoint`` then loads a file saved with ``torch.save``: a freezebench checkpoint (a dict with the state
    dict under ``"model_state"`` and optionally ``"model_name"``) or a raw state dict, which must match the
    model exactly. Raises :class:`~freezebench.errors.FreezebenchError` for unknown names, bad sizes, and
    missing, unreadable or mismatching checkpoints.
    """
    factory = MODELS.get(name)  # unknown names: the registry's error lists the known ones
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model {name!r}: {arg} must be a positive integer, got {value!r}")
    model = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, pretrained=pretrained)
    if checkpoint is not None:
        _load_checkpoint(model, name, os.fspath(checkpoint), reinit_head)
    return model
