"""`graft data add PATH --as target`: make a folder of a user's images the target, in one step that cannot be
half done by hand (`--as unlabeled`: a folder of unlabelled images an entry of data.unlabeled, add_unlabeled).

It checks the folder exactly as the prepare stage will (class folders, every image decoded, sizes, duplicates
at the training sizes, class sizes) and names every problem at once; sets what the data decides in params.yaml: a
split that fits it, the colour mode its images have, a registry model of its own for a new class set; brings the
folder into the project when it lies outside (DVC versions files inside the project: its `dvc add` would copy a
symlink's target anyway, silently); versions it with DVC; and points params.yaml's `data.target` at it. dvc.yaml
needs no edit: prepare_target's dependency is `${data.target.path}`. A folder with a problem changes nothing.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from components.config import UNLABELED_TERMS, DatasetParams, Params, ParamsError
from components.data import (
    ALPHA_MODES,
    FOLDER_LAYOUT,
    GRAY_MODES,
    SPLIT_KEYS,
    DataError,
    ImageLimits,
    Problems,
    Quarantine,
    check_class_sizes,
    class_file_counts,
    class_folders,
    data_files,
    drop_duplicates,
    file_mode,
    fitting_split,
    read_folder,
    require_folder,
    split_changes,
    split_shortfalls,
    usable_unlabeled,
)
from components.errors import GraftError
from components.settings import ModelCardParams, load_settings, parse_settings

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
QUALITY_FLOORS = ("min_accuracy", "min_macro_f1")  # gates that hold the candidate to an absolute score on its data
MODE_NAMES = {"L": "gray", "LA": "gray+alpha", "I;16": "16-bit gray", "I": "32-bit gray"}  # others: PIL's names


@dataclass(frozen=True)
class CheckedFolder:
    """What the prepare stage will make of a folder."""

    classes: tuple[str, ...]
    counts: dict[str, int]                     # usable images a class
    modes: dict[str, int]                      # usable images by what each file holds (data.file_mode)
    quarantine: list[dict]
    split: DatasetParams                       # the target with a split that fits (the configured one if it does)

    @property
    def usable(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class AddedTarget:
    path: str  # relative to the project
    name: str
    classes: tuple[str, ...]
    usable: int
    quarantine: list[dict] = field(default_factory=list)
    copied: bool = False
    notes: tuple[str, ...] = ()  # one line for each setting the data decided: colour mode, split, registry model


@dataclass(frozen=True)
class AddedUnlabeled:
    path: str  # relative to the project
    name: str  # its data.unlabeled entry
    usable: int
    quarantine: list[dict] = field(default_factory=list)
    copied: bool = False
    notes: tuple[str, ...] = ()  # the colour conversion, the terms that now name an entry


def check_folder(folder: Path, dataset: DatasetParams, params: Params, channels: int,
                 keep_split: bool = True) -> CheckedFolder:
    """Read `folder` as the prepare stage will, in `channels`; every problem no skipping can fix (an empty class, a
    symlink out of the folder, a class too small, no split that fits) raises one DataError naming them all.
    `keep_split`: `dataset`'s split is kept where it fits; else (it was sized for other data) one is proposed."""
    problems, quarantine = Problems(collect=True), Quarantine()
    samples, classes = read_folder(folder, channels, quarantine, fail_fast=False, limits=ImageLimits.of(params.data),
                                   problems=problems)
    samples = drop_duplicates(samples, classes, quarantine, fail_fast=False, sizes=tuple(params.sources.image_sizes()))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    check_class_sizes(labels, classes, params.data.min_images_per_class, str(folder), problems)
    counts = dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist()))
    # A class below min_images_per_class is named already; the split is judged on classes that can be used.
    usable = min(counts.values(), default=0) >= params.data.min_images_per_class
    split = fitting_split(counts, dataset, str(folder), problems, keep=keep_split) if usable else None
    if problems.found or split is None:
        raise DataError(_problem_report(folder, problems.found, quarantine.entries))
    modes = dict(Counter(s.mode for s in samples).most_common())
    return CheckedFolder(classes, counts, modes, quarantine.entries, split)


def declared_modes(folder: Path, limits: ImageLimits) -> dict[str, int]:
    """What the files in the class folders hold (data.file_mode), from their headers: only palette images are
    decoded (their palette says whether they are gray). Files the data cannot use by their header (not an image,
    too many pixels) are left out, and symlinks: check_folder names them."""
    modes: Counter[str] = Counter()
    for path in (file for class_folder in class_folders(folder, Problems(collect=True)) for file in data_files(class_folder)):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            with Image.open(path) as image:
                if not limits.too_many_pixels(image):
                    modes[file_mode(image)] += 1
        except Exception:  # noqa: BLE001 - whatever it is, check_folder names it properly
            continue
    return dict(modes)


def check_in_its_colour_mode(folder: Path, dataset: DatasetParams, params: Params,
                             keep_split: bool = True) -> tuple[CheckedFolder, int]:
    """check_folder in the colour mode the images ask for (channels_for), decoded once in that mode: duplicates are
    judged on the pixels the prepare stage will store. The headers choose it; should the usable images say otherwise
    (the only colour file is one that cannot be used), the folder is read again in theirs."""
    channels = channels_for(declared_modes(folder, ImageLimits.of(params.data)))
    checked = check_folder(folder, dataset, params, channels, keep_split)
    if channels_for(checked.modes) != channels:
        channels = channels_for(checked.modes)
        checked = check_folder(folder, dataset, params, channels, keep_split)
    return checked, channels


def _problem_report(folder: Path, problems: list[str], quarantine: list[dict], shown: int = 10) -> str:
    lines = [f"{folder}: {len(problems)} problem(s) to fix; nothing was changed:"]
    lines += [f"  - {problem.removeprefix(f'{folder}: ')}" for problem in problems]
    if quarantine:
        lines.append(f"  and {len(quarantine)} file(s) that would be skipped:")
        lines += [f"    {entry['file']}: {entry['reason']}" for entry in quarantine[:shown]]
        lines += [f"    ... and {len(quarantine) - shown} more"] if len(quarantine) > shown else []
    return "\n".join(lines)


def channels_for(modes: dict[str, int]) -> int:
    """3 when any image holds colour (a gray model would throw it away), 1 when every image is gray."""
    return 3 if any(mode not in GRAY_MODES for mode in modes) else 1


def images_line(modes: dict[str, int], before: int, after: int) -> str:
    counts = ", ".join(f"{count} {MODE_NAMES.get(mode, mode)}" for mode, count in modes.items())
    alpha = " (alpha: transparent pixels become black)" if any(mode in ALPHA_MODES for mode in modes) else ""
    return f"images: {counts}{alpha} -> data.channels: {after} ({f'was {before}' if after != before else 'unchanged'})"


def _shown(value: int | None) -> str:
    return "null (every training image)" if value is None else str(value)


def split_line(before: DatasetParams, checked: CheckedFolder) -> str:
    changes = split_changes(before, checked.split)
    found = f"({len(checked.classes)} classes, {checked.usable} usable images; every class in each split)"
    if changes:
        return "split: data.target." + ", ".join(f"{key} {_shown(old)} -> {_shown(new)}" for key, (old, new) in changes.items()) + f" {found}"
    kept = ", ".join(f"{key} {getattr(before, key)}" for key in SPLIT_KEYS if getattr(before, key) is not None)
    return f"split: data.target.{kept} fit {found}"


def balance_line(counts: dict[str, int], class_balance: str, tune_objective: str) -> str | None:
    """What training does about classes of unequal size (at least 2:1; smaller differences are any real data's), and
    how a score can count them alike (val and test keep the folder's shares)."""
    smallest, largest = min(counts, key=counts.get), max(counts.values())
    if largest < 2 * counts[smallest]:
        return None
    found = f"classes: {counts[smallest]} ({smallest}) to {largest} usable images, {largest / counts[smallest]:.1f}:1"
    if class_balance == "none":
        said = f"{found}; finetune.class_balance none: trained as they come (resample would even them)"
    else:
        said = f"{found}; finetune.class_balance {class_balance} evens them in training"
    if tune_objective == "val_accuracy":
        said += ("; val accuracy follows these shares: tune.objective and finetune.early_stopping.metric "
                 "val_balanced_accuracy count each class alike")
    return said


def current_classes(root: Path, dataset: DatasetParams) -> tuple[str, ...] | None:
    """The classes of the target params.yaml names now; None when they cannot be listed (an IDX set, a folder gone)."""
    if dataset.format != "folder":
        return None
    try:
        return tuple(class_file_counts(root / dataset.path, Problems(collect=True)))
    except DataError:
        return None


def model_name_for(name: str, classes: tuple[str, ...], current: str) -> str:
    """The registry model of a data set: graft-NAME; with its class set's digest when the current model already
    has that name (a class added to the same data set is still a new model)."""
    candidate = f"graft-{name}"
    if candidate != current:
        return candidate
    digest = hashlib.blake2b("\n".join(classes).encode(), digest_size=3).hexdigest()
    return f"{candidate}-{digest}"


def _scalar(value: object) -> str:
    """A YAML value on one line that reads back as `value` (quoted when plain text would read as something else; a
    mapping or list in flow style)."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=2**31).strip()
    text = str(value)
    try:
        plain = yaml.safe_load(text) == value
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:][^:#\n]*?):(?P<gap>[ \t]*)(?P<value>[^#\n]*?)(?P<comment>[ \t]+#[^\n]*)?$")


def _key_lines(lines: list[str], start: int, end: int) -> list[tuple[int, re.Match]]:
    return [(i, m) for i in range(start, end) if (m := KEY_LINE.match(lines[i].rstrip("\n")))]


def _set_key(lines: list[str], dotted: str, value: str) -> None:
    """Set one key (a.b.c) in `lines`, in place; a missing last key is added at the end of its block. Within a
    mapping written on one line (flow style: `unlabeled: {}`), that line is written again with the key set."""
    start, end, indent = 0, len(lines), 0
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate(parents):
        found = [(i, m) for i, m in _key_lines(lines, start, end) if len(m["indent"]) == indent and m["key"] == part]
        if found and found[0][1]["value"]:
            _set_in_flow_mapping(lines, *found[0], [*parents[depth + 1:], leaf], value, dotted)
            return
        if not found:
            raise ParamsError(f"params.yaml: no block `{part}:` with its keys on their own lines; set {dotted}: {value} by hand")
        start = found[0][0] + 1
        end = next((i for i, m in _key_lines(lines, start, end) if len(m["indent"]) <= indent), end)
        children = _key_lines(lines, start, end)
        indent = len(children[0][1]["indent"]) if children else indent + 2
    for i, m in _key_lines(lines, start, end):
        if len(m["indent"]) == indent and m["key"] == leaf:
            lines[i] = _with_value(m, value) + "\n"
            # A scalar written over several lines (a long text, folded) continues on the lines indented deeper.
            # A comment line ends it: the comment lines that continue a key's comment stay.
            while m["value"] and i + 1 < len(lines) and lines[i + 1].strip() and not lines[i + 1].lstrip().startswith("#") \
                    and len(lines[i + 1]) - len(lines[i + 1].lstrip(" ")) > indent:
                del lines[i + 1]
            return
    last = max((i for i in range(start, end) if lines[i].strip()), default=start - 1)
    lines.insert(last + 1, f"{' ' * indent}{leaf}: {value}\n")


def _set_in_flow_mapping(lines: list[str], index: int, match: re.Match, keys: list[str], value: str, dotted: str) -> None:
    try:
        mapping = yaml.safe_load(match["value"])
    except yaml.YAMLError:
        mapping = None  # a flow mapping continued on the next lines: not one line's to rewrite
    node = mapping
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        raise ParamsError(f"params.yaml: `{match['key']}: {match['value']}` is not a mapping on one line; set {dotted}: "
                          f"{value} by hand")
    node[keys[-1]] = yaml.safe_load(value)
    lines[index] = _with_value(match, _scalar(mapping)) + "\n"


def _with_value(match: re.Match, value: str) -> str:
    """The key's line with `value`, its comment kept where it was (when the value leaves room)."""
    head = f"{match['indent']}{match['key']}:{match['gap'] or ' '}"
    comment = match["comment"] or ""
    if not comment:
        return head + value
    width = len(match["value"]) + len(comment) - len(comment.lstrip())  # from the value's start to the '#'
    return head + value + " " * max(1, width - len(value)) + comment.lstrip()


def set_params(params_text: str, changes: dict[str, object]) -> str:
    """params.yaml with each dotted key (data.target.test_size, data.channels, registry.model_name, ...) set,
    comments and layout kept; checked by reading the result back as params."""
    lines = params_text.splitlines(keepends=True)
    for dotted, value in changes.items():
        _set_key(lines, dotted, _scalar(value))
    text = "".join(lines)
    raw = yaml.safe_load(text)
    for dotted, value in changes.items():
        node = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            raise ParamsError(f"params.yaml: could not set {dotted} (it reads {node!r}); set {dotted}: {value} by hand")
    parse_settings(raw)
    return text


@dataclass(frozen=True)
class Destination:
    """Where a folder a user adds is versioned: itself when inside the project, else its copy in data/raw/NAME."""

    name: str
    source: Path  # the folder as given
    path: Path    # where the project keeps it
    inside: bool  # the folder is in the project already
    root: Path    # the project's

    @property
    def relative(self) -> str:
        return self.path.relative_to(self.root).as_posix()

    @classmethod
    def of(cls, root: Path, folder: Path, name: str | None) -> Destination:
        name = name or folder.resolve().name
        if not NAME.match(name):
            raise DataError(f"{name!r} is not a usable data set name: letters, digits, '.', '_' and '-' only; pass --name")
        inside = folder.resolve().is_relative_to(root)
        dest = folder.resolve() if inside else root / "data" / "raw" / name
        if not inside and dest.exists():
            raise DataError(f"{dest.relative_to(root)} already exists; pass another --name, or remove it first")
        return cls(name, folder, dest, inside, root)

    def bring_in(self) -> None:
        """Copy the folder into the project when it lies outside, then `dvc add` it."""
        from components.dvc_runner import track_raw_data

        if not self.inside:
            # Copies the bytes symlinks point at: what DVC versions must be files in the project.
            shutil.copytree(self.source, self.path, symlinks=False)
        track_raw_data([Path(self.relative)], self.root)


def add_target(root: str | Path, folder: str | Path, name: str | None = None) -> AddedTarget:
    """Check `folder`, decide the settings its data asks for, bring it into data/raw/NAME when it lies outside the
    project, `dvc add` it and point params.yaml's data.target at it. Nothing is changed when the check fails."""
    root, folder = Path(root).resolve(), Path(folder)
    params_file = root / "params.yaml"
    params = load_settings(params_file)
    require_folder(folder, FOLDER_LAYOUT)
    destination = Destination.of(root, folder, name)
    name, relative = destination.name, destination.relative
    # A user's own labels are all for training: labels_per_class (the default's 10, a few-labels study) is not kept.
    dataset = params.data.target.model_copy(update={"name": name, "format": "folder", "path": relative,
                                                    "labels_per_class": None})
    # A different class set is a different data set: a split sized for the previous one (the default's 2,000 test
    # images, or the fractions of a smaller folder) says nothing about this one, so its own is proposed.
    new_class_set = current_classes(root, params.data.target) != tuple(class_file_counts(folder, Problems(collect=True)))
    checked, channels = check_in_its_colour_mode(folder, dataset, params, keep_split=not new_class_set)
    changes: dict[str, object] = {"data.target.name": name, "data.target.format": "folder", "data.target.path": relative}
    changes |= {f"data.target.{key}": new for key, (_, new) in split_changes(params.data.target, checked.split).items()}
    notes = [images_line(checked.modes, params.data.channels, channels), split_line(params.data.target, checked)]
    balance = balance_line(checked.counts, params.finetune.class_balance, params.tune.objective)
    notes += [balance] if balance else []
    if nested := {name: count for name in checked.classes
                  if (count := sum(file.parent != folder / name for file in data_files(folder / name)))}:
        notes.append("subfolders: " + ", ".join(f"{name} {count}" for name, count in nested.items())
                     + " file(s) in subfolders of their class folder, read as that class")
    if channels != params.data.channels:
        changes["data.channels"] = channels
    old_model = params.registry.model_name
    if new_class_set:
        model = model_name_for(name, checked.classes, old_model)
        changes["registry.model_name"] = model
        notes.append(f"registry: model name {old_model} -> {model} (a new class set is a new model; "
                     f"{old_model}'s champion is untouched)")
        # An accuracy floor or a calibration bound is a fact about one data set: one set for the previous target
        # would judge this one blind.
        bounds = {f"gates.{key}": getattr(params.gates, key) for key in QUALITY_FLOORS if getattr(params.gates, key)}
        reset: dict[str, float | None] = {key: 0.0 for key in bounds}
        if params.gates.max_ece is not None:
            bounds["gates.max_ece"], reset["gates.max_ece"] = params.gates.max_ece, None
        if bounds:
            changes |= reset
            notes.append("gates: " + ", ".join(f"{key.removeprefix('gates.')} {value:g}" for key, value in bounds.items())
                         + f" were set for {params.data.target.name} -> "
                         + ", ".join("null (not gated)" if value is None else f"{value:g}" for value in reset.values())
                         + f" for {model}; set the bounds your use needs once you have seen its first run")
        # So is what the model is for: the card must not describe the previous target's purpose.
        stated = {f"model_card.{key}": ModelCardParams.model_fields[key].default for key in ModelCardParams.model_fields}
        if any(getattr(params.model_card, key.split(".")[1]) != default for key, default in stated.items()):
            changes |= stated
            notes.append("model_card: intended_use and out_of_scope described the previous target -> 'not stated'; "
                         "say what this model is for before its card is read")
    params_text = set_params(params_file.read_text(), changes)  # before anything is changed
    destination.bring_in()
    params_file.write_text(params_text)
    return AddedTarget(relative, name, checked.classes, checked.usable, _as_in_project(checked.quarantine, destination),
                       copied=not destination.inside, notes=tuple(notes))


def add_unlabeled(root: str | Path, folder: str | Path, name: str | None = None) -> AddedUnlabeled:
    """Check a folder of unlabelled images exactly as the prepare_unlabeled stage will (every file decoded in the
    target's colour mode, duplicates at the training sizes), bring it into data/raw/NAME when it lies outside the
    project, `dvc add` it and name it data.unlabeled.NAME. A term already on that fed on the only entry (`unlabeled:
    null`) is given that entry's name, so that what it trains on does not change. Nothing is changed when no image
    in the folder can be used."""
    root, folder = Path(root).resolve(), Path(folder)
    params_file = root / "params.yaml"
    params = load_settings(params_file)
    require_folder(folder, "the unlabelled image files (subfolders allowed)")
    destination = Destination.of(root, folder, name)
    name = destination.name
    if name in params.data.unlabeled:
        raise DataError(f"data.unlabeled.{name} exists already ({params.data.unlabeled[name].path}); pass another "
                        f"--name, or remove that entry first")
    quarantine = Quarantine()
    samples = usable_unlabeled(folder, params.data, params.sources.image_sizes(), quarantine, fail_fast=False)
    if not samples:
        raise DataError(_problem_report(folder, ["no file in the folder is a usable image; give images the target model "
                                                 "will see"], quarantine.entries))
    changes: dict[str, object] = {f"data.unlabeled.{name}": {"path": destination.relative}}
    modes = Counter(s.mode for s in samples)
    notes = [f"images: {', '.join(f'{count} {MODE_NAMES.get(mode, mode)}' for mode, count in modes.most_common())}, "
             f"read as the target's {'gray' if params.data.channels == 1 else 'RGB'} (data.channels: {params.data.channels})"]
    if len(params.data.unlabeled) == 1:
        (only,) = params.data.unlabeled
        for term in UNLABELED_TERMS:
            if getattr(params.finetune, term).uses_unlabeled and getattr(params.finetune, term).unlabeled is None:
                changes[f"finetune.{term}.unlabeled"] = only
                notes.append(f"finetune.{term}.unlabeled: null -> {only} (it fed on the only entry, which is one of two now)")
    on = [term for term in UNLABELED_TERMS if getattr(params.finetune, term).uses_unlabeled]
    notes.append(f"to learn from it: finetune.{' and finetune.'.join(on)} on already (name it in .unlabeled to use it)" if on else
                 "to learn from it: set finetune.adaptation.method (coral | mmd | dann: align the features) or "
                 "finetune.semi_supervised.method: fixmatch (pseudo-labels; .self_training.rounds: 1 for a student "
                 "on the confident ones)")
    params_text = set_params(params_file.read_text(), changes)  # before anything is changed
    destination.bring_in()
    params_file.write_text(params_text)
    return AddedUnlabeled(destination.relative, name, len(samples), _as_in_project(quarantine.entries, destination),
                          copied=not destination.inside, notes=tuple(notes))


def _as_in_project(quarantine: list[dict], destination: Destination) -> list[dict]:
    """Quarantine entries naming the files where the project keeps them."""
    return [{key: text.replace(str(destination.source), destination.relative) for key, text in entry.items()}
            for entry in quarantine]


class MissingData(GraftError):
    """A data folder that params.yaml names does not exist."""


def check_raw_data(root: str | Path, params: Params) -> None:
    """Every data folder the stages read exists, a folder data set's class folders hold files, and its split fits
    them, before any stage (or server) starts. (DVC does not see an empty folder: a class added without images would
    change nothing.) Files are counted, not opened: milliseconds for the default target's 10k."""
    missing = [(key, path) for key, path in params.raw_data_paths().items() if not (Path(root) / path).exists()]
    if not missing:
        for key, dataset in params.raw_datasets().items():
            if dataset.format == "folder":
                check_split_fits(key, dataset, Path(root) / dataset.path)
        return
    names = ", ".join(f"{path} ({key})" for key, path in missing)
    tracked = [f"{path}.dvc" for _, path in missing if (Path(root) / f"{path}.dvc").exists()]
    if tracked:
        raise MissingData(f"no data at {names}, which DVC tracks: restore it with `dvc checkout {' '.join(tracked)}` "
                          f"(from DVC's cache) or `dvc pull {' '.join(tracked)}` (from the DVC remote)")
    raise MissingData(f"no data at {names}. For the embedded default data run `graft fetch-data`; for your own, "
                      f"point the key at a folder that exists")


def check_split_fits(key: str, dataset: DatasetParams, folder: Path) -> None:
    """The split `key` configures fits the class folders' file counts (an upper bound on the usable images: the
    prepare stage has the last word); else a DataError naming the values that fit."""
    counts = class_file_counts(folder)
    if shortfalls := split_shortfalls(counts, dataset):
        fitting = fitting_split(counts, dataset, dataset.path)
        values = ", ".join(f"{key}.{name}: {after}" for name, (_, after) in split_changes(dataset, fitting).items())
        raise DataError(f"{key}: the split does not fit {dataset.path} ({len(counts)} classes, {sum(counts.values())} files): "
                        f"{'; '.join(shortfalls)}. Set {values} (every class in each split)")
