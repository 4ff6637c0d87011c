"""pretrain@NAME: Graft's own small ResNet trained on a pipeline source's data set (resumable)."""
from __future__ import annotations

import time

from components import data as data_mod
from components import distributed
from components.artifacts import sha256_json, write_json
from components.compute import resolve_compute
from components.config import Params
from components.evaluate import score, write_history
from components.layout import Layout
from components.network import ModelSpec, build, save_checkpoint
from components.predict import predict_classes
from components.train import Phase, Resume, train
from deploy.contract import COLOR_MODES, Contract


def pretrain(params: Params, name: str) -> dict:
    candidate = params.sources.pipeline[name]
    splits = data_mod.load_splits(Layout.source_data(name))
    contract = Contract(COLOR_MODES[candidate.channels], candidate.image_size, candidate.image_size,
                        tuple(candidate.mean), tuple(candidate.std))
    model = build(ModelSpec.own_resnet(splits.classes, contract, tuple(candidate.widths)), params.pretrain.seed)
    steps = params.pretrain.epochs * -(-len(splits.y_train) // params.pretrain.batch_size)
    training = {"pretrain": params.pretrain.model_dump(mode="json", exclude={"checkpoint_every_steps"}),
                "source": candidate.model_dump(mode="json"), "data_version": splits.data_version, "steps": steps}
    resume = Resume(Layout.resume_point(f"pretrain-{name}"), params.pretrain.checkpoint_every_steps,
                    sha256_json(training))
    compute = resolve_compute(params.compute, model)
    started = time.perf_counter()
    history = train(model, splits, params.pretrain, [Phase("pretrain", steps, 1.0)], params.pretrain.seed, desc=f"pretrain {name}",
                    resume=resume, compute=compute)
    seconds = time.perf_counter() - started
    if not distributed.current().writer:
        return {}  # the first process writes every output
    test = score(splits.y_test, predict_classes(model, splits.x_test), splits.classes)
    metrics = {"test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1, "steps": steps}
    # Timing goes with the checkpoint, not the metrics: metrics must be identical on a rerun.
    save_checkpoint(model, Layout.source_model(name), {"data_version": splits.data_version, "dataset": candidate.data.name,
                                                       "metrics": metrics, "train_seconds": seconds,
                                                       "compute": compute.to_dict()})
    write_history(history, Layout.pretrain_history(name))
    write_json(Layout.pretrain_metrics(name), metrics)
    resume.path.unlink(missing_ok=True)  # every output is written: the resume point has done its job
    return metrics
