"""The fine-tuning knobs of the one training loop (components/tuning.py), each on tiny real data, each with a
check that fails if the knob does nothing."""
import numpy as np
import pytest
import torch

from components.config import RegularizerParams
from components.errors import GraftError
from components.network import build, graft
from components.train import Phase, train
from components.tuning import (
    BatchSpectralShrinkage,
    Tuning,
    backbone_blocks,
    regularizer_for,
)
from tests.conftest import prepared_small_target, tiny_spec


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return prepared_small_target(tmp_path_factory.mktemp("tuning"), **{"finetune.lr": 0.1, "finetune.backbone_lr_scale": 1.0})


def _grafted(splits):
    spec = tiny_spec(splits.classes)
    return graft(build(spec, 1).backbone, spec, 0)


def _drift(model, source) -> float:
    with torch.no_grad():
        return float(sum((p - q).pow(2).sum() for p, q in zip(model.backbone.parameters(), source.backbone.parameters())))


def _finetune(model, params, splits, steps=12, **tuning):
    regularizer = tuning.pop("regularizer", None)
    knobs = Tuning(regularizer_for(RegularizerParams(**regularizer), model) if regularizer else None, **tuning)
    train(model, splits, params.finetune, [Phase("finetune", steps, 1.0)], 0, tuning=knobs)
    return model


def test_l2_sp_keeps_the_backbone_nearer_the_source_than_plain_fine_tuning(target):
    params, splits = target
    source = _grafted(splits)
    plain = _finetune(_grafted(splits), params, splits)
    pulled = _finetune(_grafted(splits), params, splits, regularizer={"kind": "l2_sp", "strength": 5.0})
    assert _drift(pulled, source) < 0.5 * _drift(plain, source), (_drift(pulled, source), _drift(plain, source))
    assert _drift(pulled, source) > 0, "still fine-tuned"


def test_l2_and_bss_penalties_are_what_the_texts_define(target):
    _, splits = target
    model = _grafted(splits)
    l2 = regularizer_for(RegularizerParams(kind="l2", strength=0.3), model)
    expected = 0.3 / 2 * sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    assert l2.penalty(model, None).item() == pytest.approx(expected, rel=1e-5)
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    singular = np.linalg.svd(features.numpy(), compute_uv=False)
    bss = BatchSpectralShrinkage(strength=2.0, k=2)
    assert float(bss.penalty(model, features)) == pytest.approx(2.0 * float((singular[-2:] ** 2).sum()), rel=1e-4)


def test_gradual_unfreezing_leaves_early_blocks_untouched_until_their_step(target):
    params, splits = target
    model = _grafted(splits)
    blocks = backbone_blocks(model.backbone)
    before = [{k: v.clone() for k, v in block.state_dict().items()} for block in blocks]
    # 5 blocks, one more every 4 steps: after 9 steps the top three have trained, the bottom two never have.
    _finetune(model, params, splits, steps=9, unfreeze_every_steps=4)
    changed = [any(not torch.equal(before[i][k], v) for k, v in block.state_dict().items()) for i, block in enumerate(blocks)]
    assert changed == [False, False, True, True, True], changed
    assert Tuning(unfreeze_every_steps=4).trainable_blocks(model, 0) == 1
    assert Tuning(unfreeze_every_steps=4).trainable_blocks(model, 100) == len(blocks)


def test_layer_wise_lr_decay_gives_lower_blocks_smaller_steps(target):
    _, splits = target
    model = _grafted(splits)
    groups = Tuning(layer_lr_decay=0.5).backbone_groups(model, 0.08)
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08])
    assert sum(len(g["params"]) for g in groups) == len(list(model.backbone.parameters()))


def test_frozen_batchnorm_keeps_the_source_statistics_while_the_weights_train(target):
    params, splits = target
    model = _grafted(splits)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    means = [m.running_mean.clone() for m in norms]
    weights = [m.weight.clone() for m in norms]
    _finetune(model, params, splits, batchnorm="frozen")
    assert all(torch.equal(a, m.running_mean) for a, m in zip(means, norms)), "running statistics moved"
    assert any(not torch.equal(w, m.weight) for w, m in zip(weights, norms)), "the affine weights still train"


def test_reinitialised_top_blocks_are_new_seeded_and_train_even_in_a_linear_probe(target):
    params, splits = target
    source = _grafted(splits)
    knobs = params.finetune.model_copy(update={"reinit_top_blocks": 2})
    model, twin = _grafted(splits), _grafted(splits)
    tuning = Tuning.of(knobs, model, seed=3)
    Tuning.of(knobs, twin, seed=3)
    pairs = list(zip(backbone_blocks(model.backbone), backbone_blocks(source.backbone), backbone_blocks(twin.backbone)))
    same = [all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), s.state_dict().values())) for m, s, _ in pairs]
    assert same == [True, True, True, False, False], "the top two blocks are not the source's"
    assert all(torch.equal(a, b) for m, _, t in pairs for a, b in zip(m.state_dict().values(), t.state_dict().values())), "seeded"
    fresh = [{k: v.clone() for k, v in m.state_dict().items()} for m, _, _ in pairs]
    train(model, splits, params.finetune, [Phase("linear_probe", 6, None)], 0, tuning=tuning)
    moved = [any(not torch.equal(fresh[i][k], v) for k, v in m.state_dict().items()) for i, (m, _, _) in enumerate(pairs)]
    assert moved == [False, False, False, True, True], "a linear probe trains the head and the re-initialised blocks only"
    with pytest.raises(GraftError, match="reinit_top_blocks is 5, but this source's backbone has 5 blocks: at most 4"):
        Tuning.of(params.finetune.model_copy(update={"reinit_top_blocks": 5}), _grafted(splits), seed=0)
