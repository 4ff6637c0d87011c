"""`graft predict`: image files through the model `graft serve` would serve, without a server, into a CSV.

The same file (alias or version, hash-checked), export variant, decoding and calibrated probabilities as POST
/predict, for scoring a folder: a backfill, a check set, images from a new site. A file that cannot be used is a row
with its reason, never the end of the run; the CSV appears whole or not at all.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from deploy.contract import Contract
from deploy.model import InputError, LoadedModel, softmax
from deploy.server import image_row


class PredictInputError(ValueError):
    """What to predict on does not exist or holds no files."""


@dataclass(frozen=True)
class FileAnswer:
    file: str
    top: tuple[tuple[str, float], ...] = ()  # (class, calibrated probability), best first; empty when unusable
    error: str = ""
    label: str = ""  # the true class, read from the file's folder (--labelled)


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and every file under the folders named (subfolders too; hidden files and folders, such as
    .DS_Store, left out), each folder's in name order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise PredictInputError(f"{path}: no such file or folder")
    if not files:
        raise PredictInputError(f"no files in {', '.join(map(str, paths))}: name image files or folders holding them")
    return files


def folder_labels(files: list[Path], paths: list[Path]) -> list[str]:
    """Each file's class as a folder of <class>/<images> says it: the first folder below the named folder that holds
    it; "" for a file named itself or lying at a named folder's top."""
    labels = []
    for file in files:
        under = [file.relative_to(path).parts for path in paths if path.is_dir() and file.is_relative_to(path)]
        labels.append(under[0][0] if under and len(under[0]) > 1 else "")
    return labels


def _model_row(file: Path, contract: Contract) -> np.ndarray | str:
    """The file as the one-row tensor the model takes, or why it cannot be used."""
    try:
        return image_row(file.read_bytes(), contract)
    except InputError as error:
        return str(error)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"


def predict_files(model: LoadedModel, files: list[Path], batch_size: int, top_k: int, labels: list[str] | None = None,
                  decode_workers: int = 1) -> Iterator[list[FileAnswer]]:
    """Answers for `files` (with `labels`, each file's true class), in their order, a batch of at most `batch_size`
    model rows at a time, each with its `top_k` classes; the files decoded by `decode_workers` threads (PIL's
    decoders release the GIL)."""
    labels = labels or [""] * len(files)
    with ThreadPoolExecutor(decode_workers, thread_name_prefix="graft-decode") as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = list(pool.map(lambda file: _model_row(file, model.contract), chunk))
            usable = [index for index, row in enumerate(decoded) if not isinstance(row, str)]
            answers = [FileAnswer(str(file), error=row if isinstance(row, str) else "", label=label)
                       for file, row, label in zip(chunk, decoded, labels[start:start + batch_size])]
            if usable:
                probabilities = softmax(model.run(np.concatenate([decoded[index] for index in usable])))
                for index, row in zip(usable, probabilities):
                    best = np.argsort(-row, kind="stable")[:top_k]
                    answers[index] = replace(answers[index], top=tuple((model.classes[i], float(row[i])) for i in best))
            yield answers


def csv_header(top_k: int, labelled: bool) -> list[str]:
    ranked = [name for rank in range(2, top_k + 1) for name in (f"class_{rank}", f"probability_{rank}")]
    return ["file", *(["label"] if labelled else []), "class", "probability", *ranked, "error"]


def write_csv(answers: Iterator[FileAnswer], out: Path, top_k: int, labelled: bool = False) -> None:
    """The answers as CSV rows (a `label` column with `labelled`), written beside `out` and moved into place once
    complete."""
    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(csv_header(top_k, labelled))
            for answer in answers:
                ranked = [value for name, probability in answer.top for value in (name, f"{probability:.6f}")]
                ranked += [""] * (2 * top_k - len(ranked))
                writer.writerow([answer.file, *([answer.label] if labelled else []), *ranked, answer.error])
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
