"""The one preprocessing contract: metadata round trip, refusal of bad contracts, numpy and torch agree."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.predict import Normalizer
from deploy.contract import Contract, ContractError, resize_chw
from deploy.model import ModelLoadError, read_contract


def test_round_trip_through_the_models_metadata():
    contract = Contract("RGB", 64, 48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    metadata = {"graft.preprocess": contract.to_json(), "graft.classes": json.dumps(["a", "b"])}
    assert read_contract(metadata) == contract
    assert contract.shape == (3, 64, 48) and contract.to_dict()["channels"] == 3


@pytest.mark.parametrize("kwargs,message", [
    ({"color_mode": "CMYK"}, "colour mode 'CMYK' is not supported; allowed: L, RGB"),
    ({"mean": (0.5, 0.5)}, "L images need 1 mean and std value"),
    ({"std": (0.0,)}, "std values must be > 0"),
    ({"resize": "nearest"}, "resize 'nearest' is not supported; allowed: bilinear"),
])
def test_a_contract_that_cannot_be_honoured_is_refused(kwargs, message):
    with pytest.raises(ContractError, match=message):
        Contract(**{"color_mode": "L", "height": 28, "width": 28, "mean": (0.5,), "std": (0.5,), **kwargs})


def test_a_model_without_a_usable_contract_does_not_load():
    with pytest.raises(ModelLoadError, match="not exported by Graft"):
        read_contract({})
    with pytest.raises(ModelLoadError, match="metadata is unusable"):
        read_contract({"graft.preprocess": json.dumps({"color_mode": "L"}), "graft.classes": "[]"})


def test_numpy_serving_and_torch_training_normalise_alike():
    contract = Contract("RGB", 8, 8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    served = contract.normalize(pixels)
    trained = Normalizer.of(contract)(torch.from_numpy(pixels)).numpy()
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, trained, atol=1e-6)


def test_pixels_convert_mode_then_resize_once():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: black on a black canvas
    image = Image.fromarray(rgba, "RGBA")
    pixels = Contract("L", 5, 10, (0.5,), (0.5,)).pixels(image)
    assert pixels.shape == (1, 5, 10) and pixels.max() == 0
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    np.testing.assert_array_equal(resize_chw(gray, 10, 20), gray[None])  # the decoded size already fits: untouched


def test_a_contract_written_before_the_features_output_still_reads():
    older = Contract("L", 28, 28, (0.5,), (0.5,)).to_dict()
    del older["features_name"]
    assert Contract.from_dict(older).features_name == "features"
