"""Where every stage output lives, relative to the project folder. No torch here: light commands (`graft run` on
an unchanged project, the registry commands, the summary) read these paths without importing the training code."""
from __future__ import annotations

from pathlib import Path

from deploy.tags import CARD_ARTIFACT, CARD_MISTAKES
from deploy.variants import VARIANT_DIR


class Layout:
    """Where every stage output lives; dvc.yaml names the same paths (a test keeps them in step)."""

    pretrained_sources = Path("models/sources.json")
    sources = Path("models/sources")
    prepared_sources = Path("data/prepared/sources")
    prepared_unlabeled = Path("data/prepared/unlabeled")
    target_data = Path("data/prepared/target.npz")
    target_report = Path("reports/prepare-target.json")
    selection_report = Path("reports/source-selection.json")
    selection_markdown = Path("reports/source-selection.md")
    selection_plot = Path("plots/source-selection.png")
    selected_data = Path("data/prepared/selected.npz")
    selected_architecture = Path("models/selected/architecture.json")
    selected_source = Path("models/selected/source.json")
    transfer_model = Path("models/transfer.pt")
    scratch_model = Path("models/scratch.pt")
    calibration = Path("models/calibration.json")
    reliability = Path("plots/reliability.png")
    mistakes_gallery = Path("plots") / Path(CARD_MISTAKES).name  # also beside the version's files: the server's page
    correct_gallery = Path("plots/correct.png")
    gallery = Path("reports/gallery.json")
    onnx_model = Path("models/model.onnx")
    onnx_variants = Path("models") / VARIANT_DIR  # those within export.max_accuracy_drop of FP32 (deploy/variants.py)
    evaluate_metrics = Path("metrics/evaluate.json")
    export_metrics = Path("metrics/export.json")
    transfer_history = Path("plots/transfer_history.csv")
    scratch_history = Path("plots/scratch_history.csv")
    predictions = Path("plots/test_predictions.csv")
    per_class = Path("reports/per-class.json")
    classification_report = Path("reports/classification-report.txt")
    confusion_transfer = Path("plots/confusion_transfer.png")
    confusion_scratch = Path("plots/confusion_scratch.png")
    curves = Path("plots/curves.png")
    gate_report = Path("reports/gates.json")
    gate_markdown = Path("reports/gates.md")
    harvest_report = Path("reports/harvest.json")  # the last `graft data harvest`: what it added, what it skipped and why
    registration = Path("outputs/registration.json")
    model_card = Path("reports") / Path(CARD_ARTIFACT).name  # by publish, for the version it registered
    history_cache = Path(".graft/cache/alias-history.json")  # not a DVC output: `graft history`'s last answer

    # per pipeline source NAME
    @staticmethod
    def source_data(name: str) -> Path:
        return Layout.prepared_sources / f"{name}.npz"

    @staticmethod
    def source_report(name: str) -> Path:
        return Path(f"reports/prepare-source-{name}.json")

    @staticmethod
    def source_model(name: str) -> Path:
        return Layout.sources / f"{name}.pt"

    @staticmethod
    def pretrain_metrics(name: str) -> Path:
        return Path(f"metrics/pretrain-{name}.json")

    @staticmethod
    def pretrain_history(name: str) -> Path:
        return Path(f"plots/pretrain-{name}.csv")

    # per data.unlabeled NAME
    @staticmethod
    def unlabeled_data(name: str) -> Path:
        return Layout.prepared_unlabeled / f"{name}.npz"

    @staticmethod
    def unlabeled_report(name: str) -> Path:
        return Path(f"reports/prepare-unlabeled-{name}.json")

    @staticmethod
    def resume_point(name: str) -> Path:
        """Not a DVC output: the state a killed training run continues from (.graft/ is ignored by git)."""
        return Path(f".graft/resume/{name}.pt")
