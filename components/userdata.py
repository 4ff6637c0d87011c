"""`graft data add PATH --as target`: make a folder of a user's images the target, in one step that cannot be
half done by hand.

It checks the folder exactly as the prepare stage will (class folders, every image decoded, sizes, duplicates
at the training sizes, class sizes, the split) and reports what would be quarantined; brings the folder into
the project when it lies outside (DVC versions files inside the project: its `dvc add` would copy a symlink's
target anyway, silently); versions it with DVC; and points params.yaml's `data.target` at it. dvc.yaml needs no
edit: prepare_target's dependency is `${data.target.path}`.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.config import DatasetParams, Params, load_params
from components.data import (
    DataError,
    Quarantine,
    check_class_sizes,
    drop_duplicates,
    read_folder,
    split_indices,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class AddedTarget:
    path: str  # relative to the project
    name: str
    classes: tuple[str, ...]
    usable: int
    quarantine: list[dict] = field(default_factory=list)
    copied: bool = False
    split_problem: str = ""  # the configured split does not fit this data: what to change


def check_folder(folder: Path, dataset: DatasetParams, params: Params) -> AddedTarget:
    """What the prepare stage will make of `folder`: usable images per class, the quarantine, the split."""
    quarantine = Quarantine()
    samples, classes = read_folder(folder, params.data.channels, quarantine, fail_fast=False,
                                   min_side=params.data.min_image_side)
    samples = drop_duplicates(samples, classes, quarantine, fail_fast=False, sizes=tuple(sorted(params.sources.image_sizes())))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    check_class_sizes(labels, classes, params.data.min_images_per_class, str(folder))
    try:
        split_indices(labels, dataset, params.data.split_seed, params.seed, classes)
        problem = ""
    except DataError as error:
        problem = str(error)
    return AddedTarget(str(folder), dataset.name, classes, len(samples), quarantine.entries, split_problem=problem)


def set_target_in_params(params_text: str, name: str, path: str) -> str:
    """params.yaml with data.target's name, format and path replaced, comments and layout kept."""
    block = re.search(r"^data:[^\n]*\n(?:(?:[ \t]+[^\n]*|)\n)*?^  target:[^\n]*\n((?:^    [^\n]*\n)+)", params_text, re.M)
    if block is None:
        raise DataError("params.yaml: no block `data:` / `  target:` with its keys on their own lines; set "
                        f"data.target.name: {name}, format: folder, path: {path} by hand")
    body = block.group(1)
    for key, value in (("name", name), ("format", "folder"), ("path", path)):
        body, found = re.subn(rf"^(    {key}:[ \t]*)[^#\n]*?([ \t]*(#[^\n]*)?)$", rf"\g<1>{value}\g<2>", body, count=1, flags=re.M)
        if not found:
            body += f"    {key}: {value}\n"
    return params_text[:block.start(1)] + body + params_text[block.end(1):]


def add_target(root: str | Path, folder: str | Path, name: str | None = None) -> AddedTarget:
    """Check `folder`, bring it into data/raw/NAME when it lies outside the project, `dvc add` it and point
    params.yaml's data.target at it. Nothing is changed when the check fails."""
    from components.pipeline import track_raw_data

    root, folder = Path(root).resolve(), Path(folder)
    params_file = root / "params.yaml"
    params = load_params(params_file)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give a folder of <class name>/<image files>")
    name = name or folder.resolve().name
    if not NAME.match(name):
        raise DataError(f"{name!r} is not a usable data set name: letters, digits, '.', '_' and '-' only; pass --name")
    inside = folder.resolve().is_relative_to(root)
    dest = folder.resolve() if inside else root / "data" / "raw" / name
    if not inside and dest.exists():
        raise DataError(f"{dest.relative_to(root)} already exists; pass another --name, or remove it first")
    dataset = params.data.target.model_copy(update={"name": name, "format": "folder", "path": str(folder)})
    checked = check_folder(folder, dataset, params)  # before anything is changed
    if not inside:
        # Copies the bytes symlinks point at: what DVC versions must be files in the project.
        shutil.copytree(folder, dest, symlinks=False)
    relative = dest.relative_to(root).as_posix()
    track_raw_data([Path(relative)], root)
    params_file.write_text(set_target_in_params(params_file.read_text(), name, relative))
    written = load_params(params_file).data.target
    if (written.name, written.path, written.format) != (name, relative, "folder"):
        raise DataError(f"params.yaml: could not set data.target (it reads {written.path!r}); set path: {relative} by hand")
    quarantine = [{key: text.replace(str(folder), relative) for key, text in entry.items()} for entry in checked.quarantine]
    return AddedTarget(relative, name, checked.classes, checked.usable, quarantine, copied=not inside,
                       split_problem=checked.split_problem)
