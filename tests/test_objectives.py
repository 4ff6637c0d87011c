"""The extra terms of the training objective (components/objectives.py) on tiny real data: the joint objective's
source term, instance weights, domain adaptation (CORAL, MMD, DANN) and FixMatch; each check fails if the term does
nothing."""
import numpy as np
import pytest
import torch

from components.augment import augment_batch
from components.config import AdaptationParams, Augment, JointParams, SemiSupervisedParams
from components.data import load_splits, prepare, without_held_out
from components.network import build, graft
from components.objectives import (
    Alignment,
    FixMatch,
    ObjectiveError,
    class_weights,
    coral,
    domain_weights,
    joint_term,
    mmd,
    schedule_factor,
)
from components.predict import Normalizer, predict_features
from components.train import Phase, train
from tests.conftest import make_small_source, prepared_small_target, tiny_spec


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Labelled Fashion-MNIST (the source) and Animal-MNIST (the target), both 28 px gray."""
    tmp = tmp_path_factory.mktemp("objectives")
    # The source split is a random draw, a little unequal by class: plain batches, as these terms were built on.
    params, target = prepared_small_target(tmp, **{"finetune.lr": 0.01, "finetune.class_balance": "none"})
    source_data = params.sources.pipeline["fashion-mnist"].data.model_copy(
        update={"path": str(make_small_source(tmp / "source", train=600, test=100)), "val_size": 100})
    prepare(source_data, params.data, 1, [28], 0, tmp / "source.npz", tmp / "source.json")
    return params, load_splits(tmp / "source.npz"), target


def _grafted(source, target):
    return graft(build(tiny_spec(source.classes), 1).backbone, tiny_spec(target.classes), 0)


def _unlabeled(target) -> np.ndarray:
    return np.concatenate([target.x_val, target.x_test])


def _adapted(domains, method: str, weight: float, steps: int = 60):
    """Train on the labelled source while aligning to the unlabelled target images."""
    params, source, target = domains
    model = _grafted(source, target)
    term = Alignment(AdaptationParams(method=method, weight=weight, batch_size=16), _unlabeled(target), model.head.in_features, 0)
    history = train(model, source, params.finetune, [Phase("finetune", steps, 1.0)], 0, terms=(term,))
    return model, history


def test_dann_drives_its_domain_classifier_toward_chance(domains):
    _, dann = _adapted(domains, "dann", 1.0)
    _, control = _adapted(domains, "dann", 0.0)  # the classifier learns, the features are not pushed
    late = lambda history: np.mean([r["domain_accuracy"] for r in history[-5:]])  # noqa: E731
    assert late(control) > 0.7, "the two domains are easy to tell apart when nothing confuses them"
    assert late(dann) < 0.65 and late(dann) < late(control) - 0.15, (late(dann), late(control))


@pytest.mark.parametrize("method, weight, distance", [("coral", 10.0, coral), ("mmd", 1.0, mmd)])
def test_alignment_brings_the_domains_features_together(domains, method, weight, distance):
    _, source, target = domains

    def gap(model) -> float:
        normalize = Normalizer.of(model.spec.contract)
        held_out = (predict_features(model, x[:100], normalize) for x in (source.x_val, target.x_test))
        return float(distance(*(torch.from_numpy(f) for f in held_out)))

    aligned, history = _adapted(domains, method, weight)
    unaligned, _ = _adapted(domains, method, 0.0)
    assert method in history[-1], "the distance is in the history"
    assert gap(aligned) < 0.5 * gap(unaligned), (gap(aligned), gap(unaligned))


def _pixels(x: np.ndarray) -> np.ndarray:
    """Cheap features: 7x7 average-pooled pixels."""
    return x.reshape(len(x), 7, 4, 7, 4).mean((2, 4)).reshape(len(x), -1).astype(np.float32)


def test_importance_weights_are_larger_for_source_examples_that_resemble_the_target(domains):
    _, source, target = domains
    # A source pool of 300 clothes and 30 animals (not the target's own images): the animals should weigh more.
    pool = np.concatenate([source.x_train[:300], target.x_val[:30]])
    weights = domain_weights(_pixels(pool), _pixels(target.x_train), clip=10.0)
    clothes, animals = weights.weights[:300], weights.weights[300:]
    assert np.median(animals) > 5 * np.median(clothes), (np.median(animals), np.median(clothes))
    assert weights.weights.mean() == pytest.approx(1.0)
    assert weights.weights.max() / np.median(weights.weights) <= 10.0 + 1e-6, "clipped at 10x the median"
    assert 1 < weights.effective_sample_size < len(pool), "a weighted sample is worth fewer examples"


def test_the_class_level_variant_keeps_the_source_classes_nearest_the_target(domains):
    _, source, target = domains
    # Source class 10 is animals (near the target), classes 0-9 clothes.
    pool = np.concatenate([source.x_train[:300], target.x_val[:30]])
    labels = np.concatenate([source.y_train[:300], np.full(30, 10)])
    kept = class_weights(_pixels(pool), labels, _pixels(target.x_train), target.y_train, keep=1)
    assert kept.details["kept_classes"] == [10]
    assert set(kept.kept) == set(range(300, 330)) and kept.weights[kept.kept].mean() == pytest.approx(1.0)
    with pytest.raises(ObjectiveError, match="keep_classes is 12, but the source has 11 classes"):
        class_weights(_pixels(pool), labels, _pixels(target.x_train), target.y_train, keep=12)


def test_the_joint_objective_keeps_learning_the_source_task_through_its_own_head(domains):
    params, source, target = domains
    model = _grafted(source, target)
    source_head = torch.nn.Linear(model.head.in_features, len(source.classes))
    featurize = lambda x: predict_features(model, x, Normalizer.of(model.spec.contract))  # noqa: E731
    term = joint_term(JointParams(weight=1.0, batch_size=16, instance_weights="domain"), source, target, source_head, featurize, 0)
    head_before = source_head.weight.detach().clone()
    history = train(model, target, params.finetune, [Phase("finetune", 48, 1.0)], 0, terms=(term,))
    assert history[-1]["source_accuracy"] > 0.25, "the source task is learnt alongside the target's (chance: 0.1)"
    assert history[-1]["source_loss"] < history[0]["source_loss"]
    assert torch.equal(source_head.weight, head_before), "the term trains its own copy of the source head"
    summary = term.summary()["weights"]
    assert summary["examples"] == len(source.y_train) and 1 < summary["effective_sample_size"] < summary["examples"]


def test_lambda_decays_as_scheduled_and_mismatched_source_images_are_refused(domains):
    assert [schedule_factor("constant", p) for p in (0, 0.5, 1)] == [1, 1, 1]
    assert [schedule_factor("linear", p) for p in (0, 0.5, 1)] == [1, 0.5, 0]
    assert schedule_factor("cosine", 0) == 1 and schedule_factor("cosine", 0.5) == pytest.approx(0.5) and schedule_factor("cosine", 1) == 0
    params, source, target = domains
    small = type(source)(**{**source.__dict__, "x_train": source.x_train[:, :, :14, :14]})
    with pytest.raises(ObjectiveError, match=r"the source's images are \(1, 14, 14\).*target's \(1, 28, 28\)"):
        joint_term(JointParams(weight=1.0), small, target, torch.nn.Linear(4, 10), lambda x: x, 0)


# ---------------------------------------------------------------- FixMatch


def _fixmatch(unlabeled: np.ndarray, head: torch.nn.Module, **params) -> FixMatch:
    return FixMatch(SemiSupervisedParams(method="fixmatch", **params), unlabeled, head)


def test_fixmatch_trains_the_strong_view_toward_the_weak_views_confident_answers_only():
    head = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4) * 10)
    # Weak views: image 0 confidently class 0, image 1 confidently class 2, image 2 undecided; any strong views.
    weak = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0.1, 0.1, 0.1, 0]])
    strong = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    features = torch.cat([weak, strong]).requires_grad_(True)
    term = _fixmatch(np.zeros((3, 1, 4, 4), np.uint8), head, threshold=0.95, weight=2.0)
    loss, metrics = term.loss(torch.arange(3), features, torch.zeros(0, 4), 0.5)
    expected = torch.nn.functional.cross_entropy(head(strong[:2]), torch.tensor([0, 2]), reduction="sum") / 3
    assert torch.allclose(loss, 2.0 * expected) and metrics["fixmatch_mask"] == pytest.approx(2 / 3)
    loss.backward()
    assert torch.count_nonzero(features.grad[:3]) == 0, "the weak view only labels: no gradient through it"
    assert torch.count_nonzero(features.grad[3:5]) > 0 and torch.count_nonzero(features.grad[5]) == 0, \
        "the undecided image's strong view is not trained"


def test_fixmatch_views_are_the_loops_augmentation_then_a_strong_augmentation_of_the_same_images():
    scaled = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    weak = scaled.flip(3)
    term = _fixmatch(np.zeros((4, 1, 16, 16), np.uint8), torch.nn.Identity(), strong_augment=Augment(cutout=0.5))
    views = term.views(scaled, weak, torch.Generator().manual_seed(2))
    assert views.shape == (8, 1, 16, 16) and torch.equal(views[:4], weak)
    erased = views[4:] != scaled
    assert erased.any() and torch.all(views[4:][erased] == 0.5), "the strong view is these images, cut out"
    assert int(erased.flatten(1).sum(1).max()) <= 8 * 8


def test_augmentations_that_are_off_draw_nothing_and_photometric_ones_stay_in_range():
    pixels = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    state = generator.get_state()
    assert torch.equal(augment_batch(pixels, Augment(), generator), pixels)
    assert torch.equal(generator.get_state(), state), "no draw: recipes without the new kinds keep their numbers"
    jittered = augment_batch(pixels, Augment(brightness=0.9, contrast=0.9), generator)
    assert 0 <= float(jittered.min()) and float(jittered.max()) <= 1 and not torch.equal(jittered, pixels)


def test_the_semi_supervised_term_sees_only_its_unlabelled_images_never_the_labelled_ones(domains):
    params, _, target = domains
    model = graft(build(tiny_spec(target.classes), 1).backbone, tiny_spec(target.classes), 0)
    # Unlabelled images: the target's training images upside down (no labelled image is among them), with a copy
    # of a test image that must be left out.
    unlabeled, dropped = without_held_out(np.concatenate([target.x_train[:, :, ::-1], target.x_test[:3]]), target)
    assert dropped == 3 and len(unlabeled) == len(target.x_train)
    seen: list[torch.Tensor] = []

    class Recording(FixMatch):
        def views(self, scaled, augmented, generator):
            seen.append(scaled.clone())
            return super().views(scaled, augmented, generator)

    term = Recording(SemiSupervisedParams(method="fixmatch", batch_size=8, threshold=0.5), unlabeled, model.head)
    history = train(model, target, params.finetune, [Phase("finetune", 6, 1.0)], 0, terms=(term,))
    assert {"fixmatch_loss", "fixmatch_mask"} <= set(history[-1])
    pool, labelled = {image.tobytes() for image in unlabeled}, {image.tobytes() for image in target.x_train}
    drawn = {(image * 255).round().to(torch.uint8).numpy().tobytes() for batch in seen for image in batch}
    assert len(seen) == 6 and len(drawn) > 8 and drawn <= pool and not drawn & labelled
