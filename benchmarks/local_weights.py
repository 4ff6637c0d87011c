"""Make torchvision-format weights on this machine, for studies that need more sources than are offline here.

No ImageNet weights for torchvision architectures can be downloaded on these machines. This pretrains a
torchvision architecture on a source data set with Graft's own training loop and saves a state_dict that loads
like any torchvision checkpoint (`torchvision.models.get_model(arch, num_classes=K).load_state_dict(...)`), so
it can be a `weights_file` source. The weights are real (trained) but NOT ImageNet weights: say so wherever
they are used.

    .venv/bin/python benchmarks/local_weights.py --architecture resnet18 --image-size 32 --epochs 2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from components.config import load_params
from components.data import load_splits, prepare
from components.evaluate import score
from components.network import ModelSpec, build
from components.source_models import IMAGENET_MEAN, IMAGENET_STD
from components.predict import Normalizer, predict_logits
from components.train import Phase, train
from deploy.contract import Contract


def pretrain_torchvision(architecture: str, source: str, image_size: int, epochs: int, out: Path, params_path: Path) -> dict:
    params = load_params(params_path)
    candidate = params.sources.pipeline[source]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "source.npz"
        prepare(candidate.data, params.data, 3, [image_size], params.data.split_seed, data, Path(tmp) / "report.json")
        splits = load_splits(data)
    contract = Contract("RGB", image_size, image_size, IMAGENET_MEAN, IMAGENET_STD)
    spec = ModelSpec(architecture, splits.classes, contract, 3, IMAGENET_MEAN, IMAGENET_STD)
    model = build(spec, params.pretrain.seed)
    steps = epochs * -(-len(splits.y_train) // params.pretrain.batch_size)
    started = time.perf_counter()
    train(model, splits, params.pretrain, [Phase("pretrain", steps, 1.0)], params.pretrain.seed, desc=f"pretrain {architecture}")
    seconds = time.perf_counter() - started
    predicted = predict_logits(model, splits.x_test, Normalizer.of(contract)).argmax(1).numpy()
    accuracy = score(splits.y_test, predicted, splits.classes).accuracy
    # The backbone is the torchvision network with its head replaced by Identity: its keys are torchvision's,
    # and the trained head goes back under the head's own name.
    from components.network import head_path, imagenet_network

    head = head_path(imagenet_network(architecture), architecture)
    state = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith(f"{head}.")}
    state.update({f"{head}.weight": model.head.weight.detach(), f"{head}.bias": model.head.bias.detach()})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return {"architecture": architecture, "source": source, "image_size": image_size, "epochs": epochs, "steps": steps,
            "source_test_accuracy": accuracy, "train_seconds": seconds, "file": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", required=True, help="a torchvision.models classification name")
    parser.add_argument("--source", default="fashion-mnist", help="a pipeline source in params.yaml (its data)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, help="default: benchmarks/weights/<architecture>-<source>.pth")
    args = parser.parse_args()
    out = args.out or Path("benchmarks/weights") / f"{args.architecture}-{args.source}.pth"
    result = pretrain_torchvision(args.architecture, args.source, args.image_size, args.epochs, out, args.params)
    print(result)


if __name__ == "__main__":
    main()
