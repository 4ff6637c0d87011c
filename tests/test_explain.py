"""Explanations: the gallery picks the most confident mistakes, the correct sample stays within its class, and Grad-CAM
maps come from a layer that still has a spatial map, in [0, 1], pointing where the evidence is."""
import numpy as np
import pytest
import torch
from torch import nn

from components.explain import (
    MIN_MAP_SIDE,
    cam_layer,
    correct_sample,
    examples,
    grad_cam,
    most_confident_mistakes,
    plot_gallery,
)
from components.network import GraftNet, build
from tests.conftest import tiny_spec


def test_the_gallery_picks_the_highest_confidence_mistakes_first():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.97, 0.03], [0.55, 0.45], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 1, 1, 1])  # wrong: 1 (0.8), 2 (0.6), 3 (0.97), 4 (0.55)
    assert most_confident_mistakes(probabilities, labels, 3).tolist() == [3, 1, 2]
    assert most_confident_mistakes(probabilities, labels, 10).tolist() == [3, 1, 2, 4]
    shown = examples(np.array([3]), probabilities, labels, ("cat", "dog"), np.array(["a.png"] * 6))
    assert shown[0].to_dict() == {"index": 3, "origin": "a.png", "true": "dog", "predicted": "cat", "confidence": 0.97}


def test_the_correct_sample_holds_only_right_answers_of_each_class_and_is_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    probabilities = np.eye(3)[np.where(rng.random(300) < 0.7, labels, (labels + 1) % 3)]
    picked = correct_sample(probabilities, labels, 4, seed=1)
    assert len(picked) == 12 and (probabilities[picked].argmax(1) == labels[picked]).all()
    assert np.bincount(labels[picked]).tolist() == [4, 4, 4]
    assert picked.tolist() == correct_sample(probabilities, labels, 4, seed=1).tolist()
    assert picked.tolist() != correct_sample(probabilities, labels, 4, seed=2).tolist()


def test_the_map_layer_is_the_deepest_still_at_least_min_side():
    model = build(tiny_spec(tuple("ab"), widths=(8, 16, 32, 64)), 0)  # 28 -> 14 -> 7 -> 4 -> 2
    name, layer = cam_layer(model)
    with torch.no_grad():
        seen = {}
        hook = layer.register_forward_hook(lambda _m, _i, out: seen.update(side=out.shape[-1]))  # None: output kept
        model(torch.zeros(1, 1, 28, 28))
        hook.remove()
    assert seen["side"] == MIN_MAP_SIDE and name == "backbone.5"  # the third block's output, not the 2x2 fourth


class Brightness(nn.Module):
    """A backbone whose only feature is the image's mean brightness: its map is the (normalised) image itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


def test_grad_cam_points_at_the_evidence_and_is_scaled_to_one():
    model = GraftNet(tiny_spec(("dark", "bright")), Brightness(), 1)
    with torch.no_grad():  # "bright" rises with brightness
        model.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model.head.bias.zero_()
    pixels = np.full((2, 1, 28, 28), 128, dtype=np.uint8)  # normalised: about 0, no evidence either way
    pixels[0, :, :10, :10] = 255  # the evidence for "bright": top left in one image, bottom right in the other
    pixels[1, :, 18:, 18:] = 255
    maps = grad_cam(model, cam_layer(model)[1], pixels, np.array([1, 1]))
    assert maps.shape == (2, 28, 28) and maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    assert maps[0, :10, :10].min() > 0.99 and maps[0, 12:, 12:].max() < 0.01
    assert maps[1, 18:, 18:].min() > 0.99 and maps[1, :16, :16].max() < 0.01


def test_a_gallery_image_is_written_also_when_there_is_nothing_to_show(tmp_path):
    assert plot_gallery(np.zeros((0, 1, 28, 28), np.uint8), np.zeros((0, 28, 28)), [], "no mistakes",
                        tmp_path / "g.png").stat().st_size > 0
