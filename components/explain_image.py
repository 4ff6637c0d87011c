"""`graft explain IMAGE`: one image file through a registered version's PyTorch checkpoint, decoded as the server
decodes it: the class it answers, its calibrated probabilities and the Grad-CAM map of that class, drawn to a file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.artifacts import save_png  # noqa: E402
from components.calibrate import softmax  # noqa: E402
from components.errors import GraftError  # noqa: E402
from components.explain import cam_layer, grad_cam, overlay  # noqa: E402
from components.network import GraftNet  # noqa: E402
from components.predict import Normalizer  # noqa: E402


class ExplainError(GraftError):
    """A single image that cannot be explained as asked."""


@dataclass(frozen=True)
class Explanation:
    """What the model answers for one image file, and where it looked."""

    predicted: str
    probabilities: dict[str, float]  # calibrated, highest first
    temperature: float
    layer: str
    overlay: Path


def explain_image(model: GraftNet, temperature: float, image: Path, out: Path, title: str) -> Explanation:
    """One image file through the server's decoding, the model's calibrated probabilities and the Grad-CAM map of
    the class it answers, drawn to `out` (the image, the map over it, the probabilities)."""
    from deploy.model import InputError, decode_image

    try:
        pixels = decode_image(Path(image).read_bytes(), model.spec.contract).copy()  # writable, for torch
    except OSError as error:
        raise ExplainError(f"cannot read {image}: {error.strerror or error}") from None
    except InputError as error:
        raise ExplainError(f"{image}: {error}") from None
    model.eval()
    with torch.no_grad():
        logits = model(Normalizer.of(model.spec.contract)(torch.from_numpy(pixels[None]))).numpy()
    probabilities = softmax(logits, temperature)[0]
    predicted = int(probabilities.argmax())
    layer_name, layer = cam_layer(model)
    cam = grad_cam(model, layer, pixels[None], np.array([predicted]))[0]
    classes = model.spec.classes
    order = np.argsort(-probabilities, kind="stable")
    figure, (plain, explained, bars) = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    gray = pixels.shape[0] == 1
    plain.imshow(pixels[0] if gray else pixels.transpose(1, 2, 0), cmap="gray" if gray else None, vmin=0, vmax=255)
    plain.set_title(f"as the model sees it ({pixels.shape[2]} x {pixels.shape[1]})", fontsize=9)
    explained.imshow(overlay(pixels, cam))
    explained.set_title(f"Grad-CAM for {classes[predicted]}", fontsize=9)
    for axis in (plain, explained):
        axis.axis("off")
    top = order[: min(10, len(order))][::-1]
    bars.barh([classes[i] for i in top], probabilities[top], color=["tab:red" if i == predicted else "tab:gray" for i in top])
    bars.set(xlim=(0, 1), xlabel=f"calibrated probability (T = {temperature:.3g})")
    figure.suptitle(f"{title}: {classes[predicted]} ({probabilities[predicted]:.3f})", fontsize=10)
    figure.tight_layout()
    save_png(figure, out)
    return Explanation(classes[predicted], {classes[i]: float(probabilities[i]) for i in order}, temperature,
                       layer_name, Path(out))
