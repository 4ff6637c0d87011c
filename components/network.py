"""Networks: a source backbone, an optional channel adapter in front, a new head behind; and checkpoints.

A grafted model is `head(backbone(adapter(x)))`:
- the backbone is a source network with its classification layer removed: Graft's own small ResNet
  (`graft_resnet`, pretrained by the pipeline), any torchvision classification architecture, or EfficientNet-Lite0;
- the adapter maps the target's colour mode to the source's when they differ (gray target, RGB source or the
  reverse) with a 1x1 convolution that starts as an exact copy (gray -> R, G, B; RGB -> luma) and also turns the
  target's normalisation into the source's; `replicate` keeps it fixed, `learned` trains it with the head;
- the head is a new linear layer for the target's classes.
The strategies (components/train.py) act on exactly this split: the backbone, and the new layers (adapter, head).

A checkpoint is two files: `<name>.pt` holds only a state_dict (loaded with weights_only=True) and
`<name>.json` holds what is needed to rebuild and use it (the spec: architecture, classes, contract).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from components.artifacts import atomic_path, read_json, write_json
from components.errors import GraftError
from deploy.contract import Contract

GRAFT_RESNET = "graft_resnet"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601: PIL's own RGB -> L conversion
# Where the classification layer sits when it is not the network's last Linear layer (that rule finds
# fc, classifier[-1], heads.head, head, _fc for every other torchvision family).
HEAD_EXCEPTIONS = {"squeezenet": "classifier.1"}  # a 1x1 convolution to the classes, then ReLU and pooling


class ArchitectureError(GraftError, ValueError):
    """An architecture name that Graft cannot build, or weights that do not fit it."""


# ---------------------------------------------------------------- Graft's own small ResNet


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def small_resnet(in_channels: int, widths: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """3x3 stem at full resolution, one stride-2 BasicBlock a width, global pooling: (backbone, feature size)."""
    stem_width = widths[0]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU()]
    previous = stem_width
    for width in widths:
        layers.append(BasicBlock(previous, width, stride=2))
        previous = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), previous


# ---------------------------------------------------------------- ImageNet architectures


def architectures() -> list[str]:
    """Every architecture name a pretrained source may use."""
    import torchvision

    return sorted([EFFICIENTNET_LITE0, *torchvision.models.list_models(module=torchvision.models)])


def is_architecture(name: str) -> bool:
    """Listing torchvision's models imports every model module (3.6 s here): the package's own is known at once."""
    return name == EFFICIENTNET_LITE0 or name in architectures()


def imagenet_network(architecture: str) -> nn.Module:
    """The architecture with its 1000-class ImageNet head, randomly initialised (weights are loaded later)."""
    if architecture == EFFICIENTNET_LITE0:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0")
    import torchvision

    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ArchitectureError(f"unknown architecture {architecture!r}; allowed: {', '.join(architectures())}")
    with warnings.catch_warnings():  # Inception and GoogLeNet announce a future change of their random init
        warnings.filterwarnings("ignore", "The default weight initialization", FutureWarning)
        return torchvision.models.get_model(architecture, weights=None)


def drop_auxiliary_heads(network: nn.Module) -> None:
    """Inception v3 and GoogLeNet train with extra heads; a grafted model has one head."""
    if getattr(network, "aux_logits", False):
        network.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if hasattr(network, name):
                setattr(network, name, None)


def head_path(network: nn.Module, architecture: str) -> str:
    """The dotted name of the classification layer: per family, else the network's last Linear layer."""
    for family, path in HEAD_EXCEPTIONS.items():
        if architecture.startswith(family):
            return path
    linear = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ArchitectureError(f"{architecture}: no linear classification layer found to replace")
    return linear[-1]


def split_head(network: nn.Module, architecture: str) -> tuple[nn.Module, nn.Module, int]:
    """Remove the classification layer in place: (the network as a backbone giving features, the old head, feature size)."""
    drop_auxiliary_heads(network)
    path = head_path(network, architecture)
    head = network.get_submodule(path)
    features = head.in_features if isinstance(head, nn.Linear) else head.in_channels
    network.set_submodule(path, nn.Identity())
    return network, head, features


# ---------------------------------------------------------------- the grafted model


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network and feed it."""

    architecture: str
    classes: tuple[str, ...]
    contract: Contract                       # what the model takes: the target's colour mode at the source's size
    source_channels: int                     # what the backbone's first layer takes
    source_mean: tuple[float, ...]           # the backbone's own normalisation, which the adapter reproduces
    source_std: tuple[float, ...]
    channel_adapter: str = "none"            # none | replicate | learned
    widths: tuple[int, ...] = field(default=())  # graft_resnet only

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "classes": list(self.classes), "contract": self.contract.to_dict(),
                "source_channels": self.source_channels, "source_mean": list(self.source_mean),
                "source_std": list(self.source_std), "channel_adapter": self.channel_adapter, "widths": list(self.widths)}

    @classmethod
    def own_resnet(cls, classes: tuple[str, ...], contract: Contract, widths: tuple[int, ...]) -> ModelSpec:
        """Graft's own small ResNet, taking the contract's input directly (no adapter)."""
        return cls(GRAFT_RESNET, tuple(classes), contract, contract.channels, contract.mean, contract.std, widths=tuple(widths))

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        return cls(architecture=raw["architecture"], classes=tuple(raw["classes"]), contract=Contract.from_dict(raw["contract"]),
                   source_channels=raw["source_channels"], source_mean=tuple(raw["source_mean"]),
                   source_std=tuple(raw["source_std"]), channel_adapter=raw["channel_adapter"], widths=tuple(raw["widths"]))


class ChannelAdapter(nn.Module):
    """1x1 convolution from the target's channels to the source's, initialised to the exact colour conversion:
    out_c = (sum_t A[c, t] * pixel_t - source_mean_c) / source_std_c, with pixel_t recovered from the
    target-normalised input. A is ones (gray copied to every channel) or the luma weights (RGB to gray)."""

    def __init__(self, contract: Contract, source_channels: int, source_mean: tuple[float, ...],
                 source_std: tuple[float, ...], trainable: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(contract.channels, source_channels, 1, bias=True)
        mix = torch.ones(source_channels, contract.channels) if contract.channels == 1 else torch.tensor([LUMA] * source_channels)
        target_mean, target_std = torch.tensor(contract.mean), torch.tensor(contract.std)
        mean, std = torch.tensor(source_mean).unsqueeze(1), torch.tensor(source_std).unsqueeze(1)
        with torch.no_grad():
            self.conv.weight.copy_((mix * target_std / std).view_as(self.conv.weight))
            self.conv.bias.copy_(((mix * target_mean).sum(1, keepdim=True) - mean).squeeze(1) / std.squeeze(1))
        self.conv.requires_grad_(trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GraftNet(nn.Module):
    def __init__(self, spec: ModelSpec, backbone: nn.Module, features: int) -> None:
        super().__init__()
        self.spec = spec
        self.adapter: nn.Module = nn.Identity()
        if spec.channel_adapter != "none":
            self.adapter = ChannelAdapter(spec.contract, spec.source_channels, spec.source_mean, spec.source_std,
                                          trainable=spec.channel_adapter == "learned")
        self.backbone = backbone
        self.head = nn.Linear(features, len(spec.classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.adapter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def new_parameters(self) -> list[nn.Parameter]:
        """What grafting added (head, trainable adapter): trained at the head's learning rate in every phase."""
        return [p for p in (*self.head.parameters(), *self.adapter.parameters()) if p.requires_grad]


def adapter_for(target_channels: int, source_channels: int, choice: str) -> str:
    return "none" if target_channels == source_channels else choice


def backbone_of(spec: ModelSpec) -> tuple[nn.Module, int]:
    if spec.architecture == GRAFT_RESNET:
        return small_resnet(spec.source_channels, spec.widths)
    backbone, _, features = split_head(imagenet_network(spec.architecture), spec.architecture)
    return backbone, features


def build(spec: ModelSpec, seed: int) -> GraftNet:
    """A randomly initialised network (the scratch baseline, or the frame a checkpoint is loaded into)."""
    torch.manual_seed(seed)
    backbone, features = backbone_of(spec)
    return GraftNet(spec, backbone, features)


def graft(source_backbone: nn.Module, spec: ModelSpec, seed: int) -> GraftNet:
    """A new model for the target classes: the source backbone's weights, a new head (and adapter), seeded."""
    model = build(spec, seed)
    try:
        model.backbone.load_state_dict(source_backbone.state_dict())
    except RuntimeError as error:
        raise ArchitectureError(f"the source backbone does not fit {spec.architecture} as specified: {str(error)[:300]}") from None
    return model


def save_checkpoint(model: GraftNet, path: Path, extra: dict | None = None) -> Path:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(path.with_suffix(".json"), {"spec": model.spec.to_dict(), **(extra or {})})
    return path


def load_checkpoint(path: Path) -> tuple[GraftNet, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; run the stage that writes it first")
    meta = read_json(path.with_suffix(".json"))
    model = build(ModelSpec.from_dict(meta["spec"]), 0)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model, meta
