"""Every name Graft writes beside a model, stated once: the ONNX file's metadata keys and the registry's tags.

components/ writes them; deploy/ (the server, its page) reads them without torch or mlflow.
"""
from __future__ import annotations

# ---- ONNX metadata: what the exported file itself carries
CONTRACT_KEY = "graft.preprocess"      # the preprocessing contract (deploy/contract.py)
CLASSES_KEY = "graft.classes"
SOURCE_KEY = "graft.source"            # the source's identity, JSON
STRATEGY_KEY = "graft.strategy"        # also a registry tag of the same name
DATA_VERSION_KEY = "graft.data_version"  # also a registry tag of the same name
DRIFT_REFERENCE_KEY = "graft.drift_reference"  # in-distribution features to test drift against (deploy/drift.py)

# ---- a model version's files beside its ONNX files
CARD_FOLDER = "card"                   # the version's model card (components/card.py): `graft card`, the server's page
CARD_ARTIFACT = f"{CARD_FOLDER}/model-card.md"
CARD_MISTAKES = f"{CARD_FOLDER}/mistakes.png"  # its most confident test mistakes with Grad-CAM (plots/mistakes.png)

# ---- registry tags of a model version (and of its MLflow run)
CANDIDATE_TAG = "graft.candidate"      # what the candidate is (components/registry.py candidate_key)
JUDGED_TAG = "graft.judged_with"       # the gate params its verdict was reached with (judged_key)
GATES_TAG = "graft.gates"              # passed | failed
AUDIT_PREFIX = "graft.audit."          # alias moves and canary share changes
# ---- registry tags of the registered model
CANARY_SHARE_TAG = "graft.canary.share"  # the percent of live traffic the canary alias's version answers (absent: 0)
TRAFFIC_AT_TAG = "graft.traffic.at"    # when the latest alias move or share change takes effect on every server (Unix s)
ONNX_SHA_TAG = "graft.onnx.sha256"     # the FP32 file's; a variant's: deploy/variants.py sha_tag
RUN_ID_TAG = "graft.run_id"
STAGE_TAG = "graft.stage"              # on runs: pretrain | retrain
SERVING_PROVIDER_TAG = "graft.serving_provider"
SELECTION_TAG = "graft.selection"
SELECTION_DECIDED_BY_TAG = "graft.selection.decided_by"
TARGET_DATASET_TAG = "graft.target_dataset"
SOURCE_PREFIX = "graft.source."        # the source's name, kind, architecture, weights, image_size, dataset
SOURCE_SHA_TAG = "graft.source.sha256"
SOURCE_RUN_ID_TAG = "graft.source_run_id"  # a pipeline source's pretraining run
SOURCE_DATA_VERSION_TAG = "graft.source_data_version"
SWEEP_ID_TAG = "graft.sweep.id"
SWEEP_BRANCH_TAG = "graft.sweep.branch"
SWEEP_WORKER_TAG = "graft.sweep.worker"  # host:pid of the process that ran a branch
TUNE_STUDY_TAG = "graft.tune.study"    # on `graft tune`'s runs: the Optuna study's name
TUNE_TRIAL_TAG = "graft.tune.trial"    # on a trial's child run: its number
TUNE_STATE_TAG = "graft.tune.state"    # ... and how it ended: complete | pruned | failed
LINEAGE_TAGS = (STRATEGY_KEY, DATA_VERSION_KEY, GATES_TAG, SOURCE_DATA_VERSION_TAG)  # what the server's page shows

GATE_PREFIX, METRIC_PREFIX = "gate.", "metric."


def source_tag(field: str) -> str:
    return f"{SOURCE_PREFIX}{field}"


def gate_tag(gate: str, field: str) -> str:
    """A gate's `verdict`, `value` or `bound`."""
    return f"{GATE_PREFIX}{gate}.{field}"


def gate_verdicts(tags: dict[str, str]) -> dict[str, str]:
    """Each gate's verdict, by gate name, from a version's tags."""
    return {k.removeprefix(GATE_PREFIX).removesuffix(".verdict"): v for k, v in tags.items()
            if k.startswith(GATE_PREFIX) and k.endswith(".verdict")}


def metric_tag(name: str) -> str:
    return f"{METRIC_PREFIX}{name}"


def variant_score_tag(variant: str, field: str) -> str:
    return f"graft.variant.{variant}.{field}"
