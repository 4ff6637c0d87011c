"""Explanations: where in an image the model looked (Grad-CAM), and galleries of its most confident mistakes and of
correct answers per class, for a person to look at before reading any number.

Grad-CAM (Selvaraju et al., 2017) by Captum's LayerGradCam: the PyTorch team's attribution library, pure PyTorch
(no OpenCV, unlike the `grad-cam` package), and it takes the layer as an argument, which these small inputs need:
the last feature map of EfficientNet-Lite0 at 64 px is 2x2, so the map is taken from the deepest layer whose
output is still at least MIN_MAP_SIDE pixels a side, and upsampled to the image (bilinear).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from components.artifacts import save_png  # noqa: E402
from components.network import GraftNet  # noqa: E402
from components.predict import Normalizer  # noqa: E402

MIN_MAP_SIDE = 4


def cam_layer(model: GraftNet) -> tuple[str, nn.Module]:
    """The deepest module of the backbone (in the order modules finish their forward pass) whose output is a feature
    map at least MIN_MAP_SIDE a side, and not inside a module whose map is smaller (the padding of a strided
    convolution is larger than what that convolution gives); the largest map there is when none is that large."""
    finished: list[tuple[str, int]] = []

    def record(name: str, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            finished.append((name, int(output.shape[-1])))

    hooks = [module.register_forward_hook(lambda _m, _i, output, name=name: record(name, output))
             for name, module in model.backbone.named_modules() if name]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *model.spec.contract.shape))
    finally:
        for hook in hooks:
            hook.remove()
    smaller = [name for name, side in finished if side < MIN_MAP_SIDE]
    big_enough = [name for name, side in finished
                  if side >= MIN_MAP_SIDE and not any(name.startswith(f"{outer}.") for outer in smaller)]
    maps = [(name, side) for name, side in finished if side > 1] or finished
    name = big_enough[-1] if big_enough else max(maps, key=lambda m: m[1])[0]
    return f"backbone.{name}", model.backbone.get_submodule(name)


def grad_cam(model: GraftNet, layer: nn.Module, pixels: np.ndarray, targets: np.ndarray,
             batch_size: int = 64) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] of `layer` (cam_layer's choice) for uint8 images (N, C, H, W), each for its
    class in `targets`."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    explainer = LayerGradCam(model, layer)
    normalize = Normalizer.of(model.spec.contract)
    maps = []
    for start in range(0, len(pixels), batch_size):
        inputs = normalize(torch.from_numpy(pixels[start : start + batch_size]))
        attribution = explainer.attribute(inputs, target=torch.as_tensor(targets[start : start + batch_size]).long(),
                                          relu_attributions=True)
        maps.append(LayerAttribution.interpolate(attribution, tuple(inputs.shape[-2:]), "bilinear").detach()[:, 0])
    cams = torch.cat(maps).numpy() if maps else np.zeros((0, *pixels.shape[-2:]), np.float32)
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1) if len(cams) else 1
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


@dataclass(frozen=True)
class Example:
    """One test image the gallery shows: where it came from, its true and predicted class, the probability."""

    index: int
    origin: str
    true: str
    predicted: str
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)


def most_confident_mistakes(probabilities: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the wrong answers, highest top-class probability first (ties: the earlier image first)."""
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:count]


def correct_sample(probabilities: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Up to `per_class` right answers a class, drawn with `seed`, in class order."""
    rng = np.random.default_rng(seed)
    right = probabilities.argmax(1) == labels
    chosen = [rng.permutation(np.flatnonzero(right & (labels == c)))[:per_class] for c in range(probabilities.shape[1])]
    return np.concatenate([np.sort(c) for c in chosen]).astype(int) if chosen else np.zeros(0, int)


def examples(indices: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
             origins: np.ndarray) -> list[Example]:
    return [Example(int(i), str(origins[i]), classes[labels[i]], classes[int(probabilities[i].argmax())],
                    float(probabilities[i].max())) for i in indices]


def overlay(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 (C, H, W) image and a [0, 1] map -> an RGB float image with the map in the `jet` colours over it."""
    image = pixels.transpose(1, 2, 0).astype(np.float32) / 255
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    heat = plt.get_cmap("jet")(cam)[..., :3]
    return np.clip((1 - alpha) * image + alpha * heat, 0, 1)


def plot_gallery(pixels: np.ndarray, cams: np.ndarray, shown: list[Example], title: str, path: Path,
                 columns: int = 8) -> Path:
    """Each example twice, the image and the image under its Grad-CAM map, titled true -> predicted (probability)."""
    rows = max(1, -(-len(shown) // (columns // 2)))
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for slot, (image, cam, example) in enumerate(zip(pixels, cams, shown)):
        plain, explained = axes.flat[2 * slot], axes.flat[2 * slot + 1]
        gray = image.shape[0] == 1
        plain.imshow(image[0] if gray else image.transpose(1, 2, 0), cmap="gray" if gray else None, vmin=0, vmax=255)
        explained.imshow(overlay(image, cam))
        mark = "" if example.true == example.predicted else f" -> {example.predicted}"
        plain.set_title(f"{example.true}{mark}\n{example.confidence:.2f}", fontsize=7,
                        color="black" if example.true == example.predicted else "tab:red")
    if not shown:
        axes.flat[0].text(0, 0.5, "nothing to show", fontsize=10)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_png(figure, path)

