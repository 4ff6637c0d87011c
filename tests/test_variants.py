"""Which export variant a server runs: the provider's preference among those published, or the one asked for."""
import pytest

from deploy.cpu import exact_int8_entries
from deploy.variants import (
    AUTO,
    VariantError,
    choose_variant,
    published_in,
    sha_tag,
    variant_path,
)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
VNNI = {"avx2", "avx512f", "avx512_vnni"}  # /proc/cpuinfo flags of a CPU with 8-bit dot products


@pytest.mark.parametrize("provider, available, expected", [
    (CPU, ["fp32", "int8", "fp16"], "int8"),
    (CPU, ["fp32", "fp16"], "fp32"),            # int8 failed its accuracy bound: not published
    (CUDA, ["fp32", "int8", "fp16"], "fp16"),
    (CUDA, ["fp32", "int8"], "fp32"),
    (TENSORRT, ["fp32", "int8", "fp16"], "fp32"),  # TensorRT builds its own FP16 engine from the FP32 graph
])
def test_auto_serves_the_providers_best_published_variant(provider, available, expected):
    variant, why = choose_variant(AUTO, provider, available, flags=VNNI)
    assert variant == expected and provider in why


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "fp32"),                     # AVX2 only: INT8 measured no faster than FP32
    ({"avx2", "avx512f"}, "fp32"),
    ({"avx2", "avx_vnni"}, "int8"),
    ({"avx512f", "amx_int8"}, "int8"),
    ({"fp", "asimd", "asimddp"}, "int8"),          # Arm with the dot product
    (set(), "int8"),                               # flags unreadable: the published variant the export chose
])
def test_auto_serves_int8_on_the_cpu_only_where_it_has_8_bit_dot_products(flags, expected):
    variant, why = choose_variant(AUTO, CPU, ["fp32", "int8"], flags=flags)
    assert variant == expected
    assert ("no 8-bit dot-product instructions" in why) == (expected == "fp32")
    variant, why = choose_variant("int8", CPU, ["fp32", "int8"], flags=flags)
    assert variant == "int8" and why.startswith("asked for")
    assert ("INT8 runs slower than FP32 here" in why) == (expected == "fp32")


def test_a_named_variant_is_served_as_asked_or_refused_by_name():
    assert choose_variant("fp16", CPU, ["fp32", "fp16"]) == ("fp16", "asked for")
    with pytest.raises(VariantError, match="no int8 variant .*it has fp32, fp16.*max_accuracy_drop"):
        choose_variant("int8", CPU, ["fp32", "fp16"])
    with pytest.raises(VariantError, match="unknown variant 'bf16'; allowed: auto, fp32, int8, fp16"):
        choose_variant("bf16", CPU, ["fp32"])


def test_variants_live_beside_the_model_and_are_published_by_their_hash_tag(tmp_path):
    assert variant_path(tmp_path / "model.onnx", "fp32") == tmp_path / "model.onnx"
    assert variant_path(tmp_path / "model.onnx", "int8") == tmp_path / "variants" / "model.int8.onnx"
    assert variant_path(tmp_path / "mine.onnx", "fp32") == tmp_path / "mine.onnx"  # a file given by any name
    assert published_in({sha_tag("fp32"): "a", sha_tag("fp16"): "b", "other": "c"}) == ["fp32", "fp16"]


def test_an_int8_file_runs_unfused_only_on_a_cpu_without_8_bit_dot_products():
    """Where ONNX Runtime's integer kernels would saturate (x86 without VNNI), a QDQ file's convolutions run in float
    over its quantized values instead: the file's own arithmetic, as a CPU with VNNI computes it."""
    assert exact_int8_entries({"avx2", "fma"}) == {"session.disable_quant_qdq": "1"}
    assert exact_int8_entries({"avx2", "avx512f", "avx512_vnni"}) == {}
    assert exact_int8_entries(set()) == {}, "flags unreadable: ONNX Runtime's own choice"
