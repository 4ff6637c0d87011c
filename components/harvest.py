"""`graft data harvest`: what the server captured becomes versioned data.

A captured request with a feedback label becomes a labelled target image, `<target>/<class>/production-<id>.<ext>`:
the class folders keep their meaning, and the prepare stage puts these files in the training and validation splits
only (components/data.py is_production), so the test split's images stay exactly what they were. The rest become
unlabelled images (`data.unlabeled.production`) for the domain-adaptation terms (finetune.adaptation).

Every image is validated as the prepare stage validates (decodable, at least data.min_image_side, at most
data.max_image_pixels) and compared with the target's own images: a copy of one (exact pixels) is not added,
whatever its label. Both folders are `dvc add`ed: a harvest that adds something is a new data version. A harvest
is idempotent: an item already harvested is not written again, so a second harvest with nothing new changes nothing.
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from components.artifacts import read_json, write_json
from components.config import UNLABELED_TERMS
from components.data import (
    PRODUCTION_PREFIX,
    DataError,
    ImageLimits,
    Unusable,
    class_file_counts,
    data_files,
    decode_file,
    is_production,
    pixels_digest,
)
from components.layout import Layout
from components.settings import Settings, load_settings
from components.userdata import set_params
from deploy.capture import CapturedItem, iter_items
from deploy.contract import Contract

PRODUCTION = "production"  # the data.unlabeled entry harvest fills
UNLABELLED_FOLDER = "data/raw/production-unlabelled"  # where it lives unless params.yaml names another folder


@dataclass
class Harvest:
    captured: int = 0                 # complete captured items read
    labelled: int = 0                 # ... of which carry a feedback label
    added_labelled: dict[str, int] = field(default_factory=dict)  # new labelled target images, by class
    added_unlabelled: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"id", "label", "reason"}: not used, and why
    params_changes: dict[str, object] = field(default_factory=dict)
    tracked: list[str] = field(default_factory=list)  # folders `dvc add`ed: a new data version

    @property
    def changed(self) -> bool:
        return bool(self.tracked)

    def skip(self, item: CapturedItem, reason: str) -> None:
        self.skipped.append({"id": item.id, "label": item.label, "reason": reason})


def capture_folder(root: Path, params: Settings) -> Path:
    folder = Path(params.serving.capture.folder)
    return folder if folder.is_absolute() else root / folder


def _item_image(item: CapturedItem) -> tuple[bytes, str]:
    """The captured input as image file bytes and extension: an upload as it arrived, a tensor row (the model's
    normalised input) turned back into the 8-bit pixels it was made from, as PNG."""
    if item.input_kind == "image":
        return item.input_bytes(), item.input_suffix
    contract = Contract.from_dict(item.record["preprocess"])
    tensor = item.tensor()
    mean = np.asarray(contract.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(contract.std, np.float32).reshape(-1, 1, 1)
    pixels = np.clip(np.rint((tensor * std + mean) / contract.scale), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[0] if contract.channels == 1 else pixels.transpose(1, 2, 0), contract.color_mode).save(buffer, "PNG")
    return buffer.getvalue(), ".png"


def _digests(files: list[Path], root: Path, channels: int, limits: ImageLimits) -> dict[bytes, str]:
    """The decoded pixels of each usable file -> its name (an unusable one the prepare stage quarantines)."""
    digests: dict[bytes, str] = {}
    for path in files:
        try:
            digests.setdefault(pixels_digest(decode_file(path, channels, limits)[0]), path.relative_to(root).as_posix())
        except Unusable:
            continue
    return digests


def _unlabelled_folder(root: Path, params: Settings) -> Path:
    entry = params.data.unlabeled.get(PRODUCTION)
    return root / (entry.path if entry else UNLABELLED_FOLDER)


def _params_changes(params: Settings, unlabelled: Path, root: Path) -> dict[str, object]:
    """What params.yaml needs for the retrain to align with the unlabelled production images."""
    changes: dict[str, object] = {}
    if PRODUCTION not in params.data.unlabeled:
        changes[f"data.unlabeled.{PRODUCTION}"] = {"path": unlabelled.relative_to(root).as_posix()}
    adaptation, wanted = params.finetune.adaptation, params.production.adaptation
    if wanted != "none" and adaptation.method == "none":
        changes["finetune.adaptation.method"] = wanted
    # Every term on that feeds on unlabelled images (a semi-supervised one the operator turned on too) learns
    # from production's; null meant "the only entry", and there are two now.
    for term in UNLABELED_TERMS:
        chosen = getattr(params.finetune, term)
        if (chosen.method != "none" or f"finetune.{term}.method" in changes) and chosen.unlabeled != PRODUCTION \
                and (chosen.unlabeled is not None or params.data.unlabeled):
            changes[f"finetune.{term}.unlabeled"] = PRODUCTION
    return changes


def _harvested_ids(target_files: Iterable[Path]) -> set[str]:
    """The capture ids of the target's images a harvest added (their file names carry them)."""
    return {p.stem.removeprefix(PRODUCTION_PREFIX) for p in target_files if is_production(p.name)}


def unharvested_labels(root: Path, params: Settings, items: list[CapturedItem]) -> int:
    """Captured items with a feedback label that no harvest has added to the target yet, nor skipped with that label
    (a copy of a target image, a label no class folder has: the next harvest would skip it again, so it is not
    waiting, and a retrain for it would change nothing)."""
    # A glob, not harvest's class-folder check: monitoring an idx target, or a folder with an empty class, counts
    # on instead of failing.
    harvested = _harvested_ids((root / params.data.target.path).glob(f"*/{PRODUCTION_PREFIX}*"))
    report = root / Layout.harvest_report
    skipped = {(entry["id"], entry["label"]) for entry in read_json(report)["skipped"]} if report.exists() else set()
    return sum(1 for item in items if item.label is not None and item.id not in harvested
               and (item.id, item.label) not in skipped)


def harvest(root: str | Path, capture: str | Path | None = None) -> Harvest:
    """Captured items -> new labelled target images and unlabelled production images, `dvc add`ed; params.yaml
    gets data.unlabeled.production (and the domain adaptation production.adaptation names) the first time.
    An image a label arrives for after it was harvested unlabelled joins its class, and its unlabelled copy stays
    (it is no test image: alignment may use it)."""
    from components.dvc_runner import track_raw_data

    root = Path(root).resolve()
    params_file = root / "params.yaml"
    params = load_settings(params_file)
    target, channels = params.data.target, params.data.channels
    if target.format != "folder":
        raise DataError(f"data.target {target.name} is an {target.format} data set; harvest adds images to a folder "
                        "target's class folders: make your data a folder of <class>/<images> (graft data add)")
    folder = Path(capture) if capture else capture_folder(root, params)
    if not folder.is_dir():
        raise DataError(f"{folder}: no captured requests; serve with serving.capture.enabled true (a privacy decision: "
                        "the images clients send are kept there) and send feedback labels to POST /feedback")
    target_root, unlabelled = root / target.path, _unlabelled_folder(root, params)
    classes = set(class_file_counts(target_root))
    target_files = sorted(p for c in classes for p in data_files(target_root / c) if p.is_file())
    harvested = _harvested_ids(target_files)
    unlabelled_files = sorted(p for p in unlabelled.iterdir() if p.is_file()) if unlabelled.is_dir() else []
    # A copy of an image the target holds is not added, whatever its label; nor a second copy of an unlabelled one.
    limits = ImageLimits.of(params.data)
    in_target = _digests(target_files, root, channels, limits)
    in_unlabelled = _digests(unlabelled_files, root, channels, limits)
    done_unlabelled = {p.stem for p in unlabelled_files}

    result, writes = Harvest(), []
    for item in iter_items(folder):
        result.captured += 1
        result.labelled += item.label is not None
        if item.id in (harvested if item.label is not None else done_unlabelled):
            continue
        if item.label is not None and item.label not in classes:
            result.skip(item, f"label {item.label!r} is not a class folder of {target.path} ({', '.join(sorted(classes))})")
            continue
        try:
            blob, suffix = _item_image(item)
            digest = pixels_digest(decode_file(io.BytesIO(blob), channels, limits)[0])
        except (Unusable, KeyError, ValueError, OSError) as error:
            result.skip(item, f"not a usable image: {error}")
            continue
        seen = in_target.get(digest) or (in_unlabelled.get(digest) if item.label is None else None)
        if seen is not None:
            result.skip(item, f"the same image as {seen}")
            continue
        if item.label is not None:
            dest = target_root / item.label / f"{PRODUCTION_PREFIX}{item.id}{suffix}"
            in_target[digest] = dest.relative_to(root).as_posix()
            result.added_labelled[item.label] = result.added_labelled.get(item.label, 0) + 1
        else:
            dest = unlabelled / f"{item.id}{suffix}"
            in_unlabelled[digest] = dest.relative_to(root).as_posix()
            result.added_unlabelled += 1
        writes.append((dest, blob))

    if result.added_unlabelled:
        result.params_changes = _params_changes(params, unlabelled, root)
    params_text = set_params(params_file.read_text(), result.params_changes) if result.params_changes else None
    for dest, blob in writes:  # nothing was changed before this point: a refusal above leaves the project as it was
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = root / ".graft" / "partial" / dest.name  # outside the data: no reader takes it for an image
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(blob)
        partial.replace(dest)
    tracked = [p for p, added in ((target_root, sum(result.added_labelled.values())), (unlabelled, result.added_unlabelled))
               if added]
    if tracked:
        track_raw_data([p.relative_to(root) for p in tracked], root)
        result.tracked = [p.relative_to(root).as_posix() for p in tracked]
    if params_text is not None:
        params_file.write_text(params_text)
    write_json(root / Layout.harvest_report, asdict(result))
    return result
