"""Device and precision of the training loop (components/compute.py): chosen from the machine's units, refused
where the hardware is missing, and every CPU-runnable path trained for real on tiny data."""
import numpy as np
import pytest
import torch

from components.compute import Compute, ComputeError, resolve_compute
from components.config import ComputeParams
from components.network import build
from components.train import Phase, train
from tests.conftest import prepared_small_target, tiny_spec

AMX = {"avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}
AVX2 = {"avx2", "fma"}


def test_auto_takes_bf16_only_where_the_hardware_has_it():
    auto = ComputeParams()
    assert resolve_compute(auto, cuda=False, flags=AMX).precision == "bf16"
    plain = resolve_compute(auto, cuda=False, flags=AVX2)
    assert (plain.device, plain.precision) == ("cpu", "fp32") and "emulated" in plain.reason
    assert (resolve_compute(auto, cuda=True, cuda_bf16=True, flags=AVX2).device,
            resolve_compute(auto, cuda=True, cuda_bf16=True, flags=AVX2).precision) == ("cuda", "bf16")
    assert resolve_compute(auto, cuda=True, cuda_bf16=False, flags=AVX2).precision == "fp16"
    assert resolve_compute(ComputeParams(device="cpu"), cuda=True, flags=AMX).device == "cpu", "asked for, kept"
    assert "emulated" in resolve_compute(ComputeParams(precision="bf16"), cuda=False, flags=AVX2).reason
    assert not resolve_compute(ComputeParams(channels_last="off"), cuda=False, flags=AMX).channels_last


def test_auto_keeps_depthwise_networks_in_fp32_on_the_cpu():
    """Measured: EfficientNet-Lite0 trains slower in bf16 than in fp32 on an AMX CPU (benchmarks/README.md)."""
    from components.network import ModelSpec, build
    from deploy.contract import COLOR_MODES, Contract

    contract = Contract(COLOR_MODES[3], 32, 32, (0.5,) * 3, (0.5,) * 3)
    efficientnet = build(ModelSpec("efficientnet_lite0", ("a", "b"), contract, 3, (0.5,) * 3, (0.5,) * 3), 0)
    lite = resolve_compute(ComputeParams(), efficientnet, cuda=False, flags=AMX)
    assert lite.precision == "fp32" and "depthwise" in lite.reason and lite.channels_last
    resnet = build(tiny_spec(("a", "b")), 0)
    assert resolve_compute(ComputeParams(), resnet, cuda=False, flags=AMX).precision == "bf16"
    assert resolve_compute(ComputeParams(precision="bf16"), efficientnet, cuda=False, flags=AMX).precision == "bf16", "asked for"


def test_compile_is_asked_for_said_and_refused_without_a_compiler(monkeypatch):
    compiled = resolve_compute(ComputeParams(compile=True), cuda=False, flags=AMX)
    assert compiled.compile and "torch.compile" in compiled.describe() and compiled.to_dict()["compile"] is True
    assert not resolve_compute(ComputeParams(), cuda=False, flags=AMX).compile, "off unless asked for"
    monkeypatch.setattr("components.compute.shutil.which", lambda name: None)
    with pytest.raises(ComputeError, match="compute.compile: true needs a C\\+\\+ compiler"):
        resolve_compute(ComputeParams(compile=True), cuda=False, flags=AMX)


def test_missing_hardware_is_refused_by_name():
    with pytest.raises(ComputeError, match="compute.device is cuda, but torch sees no CUDA GPU"):
        resolve_compute(ComputeParams(device="cuda"), cuda=False, flags=AMX)
    with pytest.raises(ComputeError, match="compute.precision fp16 needs a CUDA GPU"):
        resolve_compute(ComputeParams(precision="fp16"), cuda=False, flags=AMX)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return prepared_small_target(tmp_path_factory.mktemp("compute"), **{"finetune.lr": 0.01})


def _trained(target, compute: Compute, steps: int = 16):
    params, splits = target
    model = build(tiny_spec(splits.classes), 0)
    history = train(model, splits, params.finetune, [Phase("scratch", steps, 1.0)], 0, compute=compute)
    return model, history


@pytest.fixture(scope="module")
def reference(target):
    """Plain fp32 in the default layout, trained once for every mode to be compared with (it is deterministic)."""
    return _trained(target, Compute("cpu", "fp32", False, "test"))


@pytest.mark.parametrize("compute", [Compute("cpu", "bf16", True, "test"), Compute("cpu", "bf16", False, "test"),
                                     Compute("cpu", "fp32", True, "test"), Compute("cpu", "fp16", True, "test"),
                                     Compute("cpu", "fp32", False, "test", compile=True)],
                         ids=["bf16-channels-last", "bf16", "fp32-channels-last", "fp16-grad-scaler", "fp32-compiled"])
def test_every_precision_and_layout_trains_and_hands_back_an_fp32_contiguous_model(target, reference, compute):
    reference, reference_history = reference
    model, history = _trained(target, compute)
    assert all(np.isfinite(r["train_loss"]) for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"], "it learns"
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    if compute.precision != "fp32":
        drift = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
        assert drift > 0, "autocast really ran in the lower precision"
    again, again_history = _trained(target, compute)
    assert again_history == history, "deterministic on one machine in every mode"
    # The same arithmetic up to rounding: the final losses agree to a few percent.
    assert history[-1]["train_loss"] == pytest.approx(reference_history[-1]["train_loss"], rel=0.15)
