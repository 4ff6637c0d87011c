"""The backbone + head network, grafting a new head, and checkpoints.

A checkpoint is two files: `<name>.pt` holds only a state_dict (loaded with weights_only=True) and
`<name>.json` holds what is needed to rebuild and use it: architecture, classes, preprocessing contract.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from components.artifacts import atomic_path, read_json, write_json


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network and feed it: architecture and preprocessing contract."""

    in_channels: int
    image_size: int
    widths: tuple[int, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


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


class Classifier(nn.Module):
    """A small ResNet: 3x3 stem at full resolution, then one stride-2 BasicBlock a width, pool, linear head."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        stem_width = spec.widths[0]
        layers: list[nn.Module] = [nn.Conv2d(spec.in_channels, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU()]
        previous = stem_width
        for width in spec.widths:
            layers.append(BasicBlock(previous, width, stride=2))
            previous = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(previous, len(spec.classes))
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build(spec: ModelSpec, seed: int) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(spec)


def graft(source: Classifier, target_spec: ModelSpec, seed: int) -> Classifier:
    """A new model for the target classes: the source backbone's weights, a freshly initialised head."""
    if (source.spec.in_channels, source.spec.widths) != (target_spec.in_channels, target_spec.widths):
        raise ValueError(
            f"the source backbone (channels={source.spec.in_channels}, widths={list(source.spec.widths)}) does not fit "
            f"the target (channels={target_spec.in_channels}, widths={list(target_spec.widths)}); "
            "set data.channels / model.widths the same for both or pretrain again"
        )
    model = build(target_spec, seed)
    model.backbone.load_state_dict(source.backbone.state_dict())
    return model


def save_checkpoint(model: Classifier, path: Path, extra: dict | None = None) -> Path:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(path.with_suffix(".json"), {"spec": asdict(model.spec), **(extra or {})})
    return path


def load_checkpoint(path: Path) -> tuple[Classifier, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; run the stage that writes it first")
    meta = read_json(path.with_suffix(".json"))
    spec = ModelSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
    model = Classifier(spec)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model, meta
