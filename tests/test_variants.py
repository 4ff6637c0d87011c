"""Which export variant a server runs: the provider's preference among those published, or the one asked for."""
import pytest

from deploy.variants import (
    AUTO,
    VariantError,
    choose_variant,
    published_in,
    sha_tag,
    variant_path,
)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize("provider, available, expected", [
    (CPU, ["fp32", "int8", "fp16"], "int8"),
    (CPU, ["fp32", "fp16"], "fp32"),            # int8 failed its accuracy bound: not published
    (CUDA, ["fp32", "int8", "fp16"], "fp16"),
    (CUDA, ["fp32", "int8"], "fp32"),
    (TENSORRT, ["fp32", "int8", "fp16"], "fp32"),  # TensorRT builds its own FP16 engine from the FP32 graph
])
def test_auto_serves_the_providers_best_published_variant(provider, available, expected):
    variant, why = choose_variant(AUTO, provider, available)
    assert variant == expected and provider in why


def test_a_named_variant_is_served_as_asked_or_refused_by_name():
    assert choose_variant("fp16", CPU, ["fp32", "fp16"]) == ("fp16", "asked for")
    with pytest.raises(VariantError, match="no int8 variant .*it has fp32, fp16.*max_accuracy_drop"):
        choose_variant("int8", CPU, ["fp32", "fp16"])
    with pytest.raises(VariantError, match="unknown variant 'bf16'; allowed: auto, fp32, int8, fp16"):
        choose_variant("bf16", CPU, ["fp32"])


def test_variants_live_beside_the_model_and_are_published_by_their_hash_tag(tmp_path):
    assert variant_path(tmp_path / "model.onnx", "fp32") == tmp_path / "model.onnx"
    assert variant_path(tmp_path / "model.onnx", "int8") == tmp_path / "variants" / "model.int8.onnx"
    assert published_in({sha_tag("fp32"): "a", sha_tag("fp16"): "b", "other": "c"}) == ["fp32", "fp16"]
