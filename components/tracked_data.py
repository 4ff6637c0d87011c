"""The raw data DVC tracks (`PATH.dvc`) must be whole: in the project folder, or restorable from DVC's cache
byte for byte.

DVC trusts its cache. A corrupted cache object shows in `dvc status` only as "not in cache" for the whole folder,
and a later checkout fails with "missing data 'source'", naming neither the file nor the way back. This looks at
every file of such a folder: a cache object whose project copy is intact is restored from that copy (the bytes
are checked against the hash the `.dvc` file pins); a file that is intact nowhere is named, with the command
that restores it from the DVC remote, or what to do when there is none.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.artifacts import atomic_path
from components.dvc_runner import track_raw_data
from components.errors import GraftError


class DataLost(GraftError):
    """Files of a DVC-tracked folder are neither in the project nor intact in DVC's cache."""


@dataclass(frozen=True)
class CacheProblem:
    path: str  # the file in the project, relative to the root (the folder for its file list)
    cache_object: Path
    problem: str  # "corrupted in" or "missing from" (DVC's own status check deletes a corrupted object it reads)
    recoverable: bool  # the project's copy has the pinned bytes
    file_list: bool = False  # the object is the folder's list of files, not a file

    def describe(self) -> str:
        what = f"the file list of {self.path}/" if self.file_list else self.path
        return f"{what} ({self.problem} the DVC cache: {self.cache_object})"


def md5_of(path: Path) -> str | None:
    """DVC's content hash of a file; None when there is no file."""
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _dvc_answer(root: Path, *args: str) -> str | None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _state(cache_object: Path, md5: str) -> str | None:
    """None when the object holds the bytes its name promises."""
    if not cache_object.is_file():
        return "missing from"
    return None if md5_of(cache_object) == md5.removesuffix(".dir") else "corrupted in"


def _file_list(folder: Path) -> bytes:
    """The folder's file list as DVC stores it (a `.dir` object), built from the project's copy."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        tree.add(path.relative_to(folder).parts, None, HashInfo("md5", md5_of(path)))
    return tree.as_bytes()


def _problems(root: Path, cache: Path, out: dict, base: Path) -> list[CacheProblem]:
    """What is wrong with one tracked output (a file or a folder) in the cache, and whether the project's copy
    can put it right."""
    md5, target = out["md5"], base / out["path"]
    shown = target.relative_to(root).as_posix()
    if not md5.endswith(".dir"):
        state = _state(_object(cache, md5), md5)
        return [CacheProblem(shown, _object(cache, md5), state, md5_of(target) == md5)] if state else []
    listing = _object(cache, md5)
    if state := _state(listing, md5):
        rebuilt = _file_list(target) if target.is_dir() else b""
        recoverable = hashlib.md5(rebuilt).hexdigest() == md5.removesuffix(".dir")
        return [CacheProblem(shown, listing, state, recoverable, file_list=True)]
    problems = []
    for entry in json.loads(listing.read_bytes()):
        cache_object = _object(cache, entry["md5"])
        if state := _state(cache_object, entry["md5"]):
            copy = target / entry["relpath"]
            problems.append(CacheProblem(f"{shown}/{entry['relpath']}", cache_object, state, md5_of(copy) == entry["md5"]))
    return problems


def _repair(problem: CacheProblem, root: Path) -> None:
    """Write the project's intact copy back as the cache object, read-only like DVC's own."""
    payload = _file_list(root / problem.path) if problem.file_list else (root / problem.path).read_bytes()
    problem.cache_object.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(problem.cache_object) as tmp:
        tmp.write_bytes(payload)
        tmp.chmod(0o444)


def _recovery(root: Path, dvc_file: str) -> str:
    remote = _dvc_answer(root, "remote", "default")
    if remote:
        return f"restore them from the DVC remote '{remote}': `dvc pull {dvc_file}`, then run graft again"
    return (f"no DVC remote is configured to restore them from: put the files back from where the data came from "
            f"(the embedded default: `graft fetch-data`), or add the remote it was pushed to "
            f"(`dvc remote add -d NAME URL`) and run `dvc pull {dvc_file}`")


def _tracked_outs(status: dict, state: str) -> list[str]:
    """The `.dvc` files whose data `dvc status` (its `--json` answer) finds in `state` ("modified", "not in cache")."""
    return [name for name, changes in status.items() if name.endswith(".dvc") and any(
        isinstance(change, dict) and state in change.get("changed outs", {}).values() for change in changes)]


def versioned_note(path: str) -> str:
    """What a command says of a data folder version_changed_data versioned again."""
    return (f"versioned {path} again: its files changed since {path}.dvc pinned them (dvc add); commit {path}.dvc "
            f"with git to keep this data version")


def version_changed_data(root: str | Path, status: dict, data_paths: list[str]) -> list[str]:
    """The tracked data folders in `data_paths` whose files changed since their `.dvc` file pinned them (images added,
    edited or removed in the project: "modified" in `dvc status`), versioned again with `dvc add`, as a whole `dvc
    repro` does with a changed data source: a model is never trained on data DVC could not give back. Their paths."""
    wanted = {Path(path).as_posix() for path in data_paths}
    versioned = [name.removesuffix(".dvc") for name in _tracked_outs(status, "modified")
                 if Path(name.removesuffix(".dvc")).as_posix() in wanted]
    if versioned:
        track_raw_data([Path(path) for path in versioned], root)
    return versioned


def check_tracked_data(root: str | Path, status: dict, keys: dict[str, str] | None = None) -> str | None:
    """Look at every DVC-tracked output that `dvc status` (its `--json` answer) finds "not in cache"; repair
    the cache from intact project copies and say so in a line; raise DataLost naming what is intact nowhere.
    `keys` maps a data folder to the params key that names it, for the message."""
    root = Path(root).resolve()
    suspects = _tracked_outs(status, "not in cache")
    if not suspects:
        return None
    cache = Path(_dvc_answer(root, "cache", "dir") or root / ".dvc" / "cache")
    repaired = []
    for dvc_file in suspects:
        base = (root / dvc_file).parent
        for out in yaml.safe_load((root / dvc_file).read_text())["outs"]:
            problems = _problems(root, cache, out, base)
            lost = [problem for problem in problems if not problem.recoverable]
            if lost:
                folder = (base / out["path"]).relative_to(root).as_posix()
                named = f"{folder} ({keys[folder]})" if keys and folder in keys else folder
                first = lost[0]
                more = f", and {len(lost) - 1} more" if len(lost) > 1 else ""
                raise DataLost(
                    f"{len(lost)} file(s) of {named} are neither in the project nor intact in the DVC cache: "
                    f"{first.describe()}{more}.\n{_recovery(root, dvc_file)}")
            for problem in problems:
                _repair(problem, root)
            repaired += problems
    if not repaired:
        return None
    more = f" and {len(repaired) - 1} more" if len(repaired) > 1 else ""
    return f"repaired the DVC cache from the project's own copy: {repaired[0].describe()}{more}"
