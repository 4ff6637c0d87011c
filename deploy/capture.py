"""Request capture and feedback: what the server answered, kept on disk for harvest (components/harvest.py) and drift
monitoring (`graft monitor`), and the true classes users send back for it.

Layout of serving.capture.folder (one segment an hour, UTC, of when the item was captured):

    <YYYY-MM-DD-HH>/<item_id>.<ext>        the input: the uploaded image file's bytes as they arrived (.png, .jpg, ...;
                                           .bin when the format is unknown), or one V2 tensor row as float32 .npy
    <YYYY-MM-DD-HH>/<item_id>.json         the record, written last: its presence means the item is whole
    <YYYY-MM-DD-HH>/<item_id>.label.json   feedback {"label": CLASS, "time": ISO}, created once

An item id is the request id (uuid4 hex, returned to the client as X-Request-Id) for a one-row request, and
"<request_id>-<row>" for each row of a V2 request with several. The record's fields: id, request_id, time (ISO 8601,
UTC), endpoint, model, version, variant, input (the input file's name), input_kind ("image" | "tensor"), input_bytes,
classes, predicted, probabilities, features (the model's penultimate features as base64 of float32 bytes, null when
the served file has none; CapturedItem.features decodes them), preprocess (the model's contract: how a tensor row was
made from pixels). Every file is written under a temporary name in its segment and renamed into place, so a killed
process leaves whole files and at most stray temporary ones (names starting with "."), which readers skip. The record
states its input's size: an input cut short by a machine crash (renamed before its data reached the disk) is found
and skipped too.

Serving never waits on the disk: `submit` queues the answer (dropping it, counted, when the bounded queue is full)
and one writer thread turns it into files, waking every GATHER_SECONDS to write what gathered. At the size budget, on
a full disk or on any other write error capturing stops for good, says so once in the log (logger graft.capture) and
in /metrics, and the server goes on answering. What capturing costs is measured in benchmarks/README.md ("Capture
overhead"): mostly the file system's, two files created and renamed an item.
"""
from __future__ import annotations

import base64
import errno
import functools
import io
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson

from deploy.contract import Contract
from deploy.settings import CaptureSettings

log = logging.getLogger("graft.capture")

ITEM_ID = re.compile(r"[0-9a-f]{32}(?:-[0-9]{1,6})?")  # what `label` accepts: no path can hide in it
SEGMENT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}-[0-9]{2}")
SEGMENT_FORMAT = "%Y-%m-%d-%H"
RECORD_SUFFIX, LABEL_SUFFIX, TEMP_SUFFIX = ".json", ".label.json", ".tmp"
# The writer's backlog: beyond either bound an answer is dropped rather than held in memory.
QUEUE_ITEMS = 1024
QUEUE_BYTES = 64 * 2**20
# The writer wakes, waits this long for more answers to come, and writes them all: one wake-up (a thread switch, the
# GIL handed over) for many answers instead of one for each.
GATHER_SECONDS = 0.05
LABEL_WAIT_SECONDS = 10.0  # feedback for an answer still in the writer's queue waits this long for it to be written

BUDGET, DISK_FULL, WRITE_ERROR, QUEUE_FULL = "budget", "disk_full", "write_error", "queue_full"
STOP_REASONS = (BUDGET, DISK_FULL, WRITE_ERROR)  # capturing stopped for good
DROP_REASONS = (QUEUE_FULL, *STOP_REASONS)  # why an answer was not captured
# The image formats a captured upload is named by, from the file's first bytes (WebP: "RIFF", size, "WEBP").
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
              (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


REQUEST_IDS_AT_ONCE = 256
_request_ids: list[str] = []


def new_request_id() -> str:
    """A uuid4 in hex, from random bytes drawn for 256 at a time: os.urandom releases the GIL, and taking it back
    once a request cost the event loop a thread switch whenever the capture writer was busy."""
    if not _request_ids:
        raw = os.urandom(16 * REQUEST_IDS_AT_ONCE)
        _request_ids.extend(uuid.UUID(bytes=raw[i: i + 16], version=4).hex for i in range(0, len(raw), 16))
    return _request_ids.pop()


class CaptureError(ValueError):
    """Feedback the store cannot take; the message says why and what would be taken."""


class InvalidItemId(CaptureError):
    pass


class UnknownItem(CaptureError):
    pass


class UnknownClass(CaptureError):
    pass


class DuplicateLabel(CaptureError):
    pass


@dataclass(frozen=True)
class Answer:
    """One answered request as the server hands it over: kept as it was, the writer thread does the rest."""

    request_id: str
    endpoint: str  # "predict" | "infer"
    model: str
    version: str
    variant: str
    classes: tuple[str, ...]
    logits: np.ndarray  # (rows, classes)
    inputs: bytes | np.ndarray  # an uploaded image file's bytes (one row), or the float32 (rows, C, H, W) tensor
    features: np.ndarray | None = None  # (rows, features): the model's penultimate features, when it gives them
    contract: Contract | None = None  # how the model's input is made from an image: a tensor row's way back to pixels
    time: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return len(self.inputs) if isinstance(self.inputs, bytes) else self.inputs.nbytes


@dataclass
class CaptureStats:
    captured: int = 0  # items written
    bytes: int = 0  # the capture folder's size as far as this store knows (scanned at start, then counted)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))  # items, by reason
    stopped: str | None = None  # a STOP_REASONS entry once capturing stopped


def _image_suffix(blob: bytes) -> str:
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for signature, suffix in SIGNATURES if blob.startswith(signature)), ".bin")


def _create(name: str, data: bytes, dir_fd: int | None = None) -> None:
    """A new file `name` (in the folder `dir_fd` when given) holding `data`; removed again if writing fails."""
    descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    except BaseException:
        os.close(descriptor)
        os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(descriptor)


def _write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """`data` as file `name` in the folder `dir_fd`: written under a temporary name, then renamed into place, so
    a reader never finds a half-written file under `name`. (Item names are unique: so is the temporary name.)"""
    temporary = f".{name}{TEMP_SUFFIX}"
    _create(temporary, data, dir_fd)
    try:
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(temporary, dir_fd=dir_fd)
        raise


def _folder_bytes(folder: Path) -> int:
    return sum((Path(root) / name).stat().st_size for root, _, names in os.walk(folder) for name in names)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


@functools.lru_cache(maxsize=16)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a float32 C-order array of `shape`: written once, not per row (np.save's cost is its
    header)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _npy(row: np.ndarray) -> bytes:
    row = np.ascontiguousarray(row, dtype="<f4")
    return _npy_header(row.shape) + row.tobytes()


@functools.lru_cache(maxsize=16)
def _preprocess(contract: Contract | None) -> dict | None:
    return None if contract is None else contract.to_dict()


def _encode_features(row: np.ndarray) -> str:
    """A feature vector as base64 of its float32 bytes: a thousand floats in decimal cost the writer more than the
    rest of the item (CapturedItem.features decodes it)."""
    return base64.b64encode(np.ascontiguousarray(row, "<f4").tobytes()).decode("ascii")


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _stop_reason(error: OSError) -> str:
    return DISK_FULL if error.errno in (errno.ENOSPC, errno.EDQUOT) else WRITE_ERROR


class CaptureStore:
    """The capture folder of one server: `submit` (non-blocking) from the event loop, `label` from a worker thread."""

    def __init__(self, settings: CaptureSettings, queue_items: int = QUEUE_ITEMS, queue_bytes: int = QUEUE_BYTES) -> None:
        self.settings, self.folder = settings, Path(settings.folder)
        self.queue_items, self.queue_bytes = queue_items, queue_bytes
        self.stats = CaptureStats()
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the writer waits here for answers
        self._written = threading.Condition(lock)  # feedback waits here for an answer still queued to be written
        self._queue: deque[Answer] = deque()  # submitted, not yet taken by the writer
        self._queued_bytes = 0  # of the answers submitted and not yet written
        self._queued_ids: set[str] = set()  # their request ids
        self._closed = False
        self._segment: tuple[int, int] | None = None  # the writer's hour folder: (hours since 1970, open descriptor)
        self._writer = threading.Thread(target=self._write_loop, name="graft-capture", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------ the server's side: cheap, never blocking on disk

    def sampled(self) -> bool:
        return self.settings.sample >= 1.0 or random.random() < self.settings.sample

    def submit(self, answer: Answer) -> bool:
        """Queue an answer for the writer; False when it is dropped (counted): capturing stopped, or the queue full."""
        size = answer.size
        with self._work:
            reason = self.stats.stopped or (QUEUE_FULL if len(self._queued_ids) >= self.queue_items
                                            or self._queued_bytes + size > self.queue_bytes else None)
            if reason is not None:
                self.stats.dropped[reason] += len(answer.logits)
                return False
            self._queue.append(answer)
            self._queued_bytes += size
            self._queued_ids.add(answer.request_id)
            self._work.notify()
        return True

    def close(self, seconds: float = 10.0) -> None:
        """Write what is queued (for at most `seconds`), then end the writer."""
        with self._work:
            self._closed = True
            self._work.notify()
        self._writer.join(seconds)

    # ------------------------------------------------------------ the writer thread

    def _write_loop(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.stats.bytes = _folder_bytes(self.folder)
        except OSError as error:
            self._stop(_stop_reason(error), f"cannot use the capture folder {self.folder}: {error}")
        try:
            while True:
                with self._work:
                    self._work.wait_for(lambda: self._queue or self._closed)
                    if not self._queue:
                        return  # closed, and everything written
                    closed = self._closed
                if not closed:
                    time.sleep(GATHER_SECONDS)
                with self._work:
                    batch, self._queue = self._queue, deque()
                self._write_batch(batch)
        finally:
            if self._segment is not None:
                os.close(self._segment[1])

    def _write_batch(self, batch: deque[Answer]) -> None:
        for answer in batch:
            try:
                self._write(answer)
            except Exception as error:  # whatever it was, the writer keeps going and the server keeps serving
                log.exception("capture of request %s failed: %s", answer.request_id, error)
        with self._work:
            for answer in batch:
                self._queued_bytes -= answer.size
                self._queued_ids.discard(answer.request_id)
            self._written.notify_all()

    def _write(self, answer: Answer) -> None:
        rows = len(answer.logits)
        probabilities = _softmax(answer.logits.astype(np.float64))
        for row in range(rows):
            if self.stats.stopped or not self._write_item(answer, row, probabilities[row]):
                self._drop(self.stats.stopped, rows - row)
                return

    def _segment_folder(self, seconds: float) -> int:
        """The open hour folder an answer given at `seconds` goes to, made when the hour is new."""
        hour = int(seconds // 3600)
        if self._segment is None or self._segment[0] != hour:
            name = datetime.fromtimestamp(hour * 3600, timezone.utc).strftime(SEGMENT_FORMAT)
            (self.folder / name).mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.folder / name, os.O_RDONLY | os.O_DIRECTORY)
            if self._segment is not None:
                os.close(self._segment[1])
            self._segment = (hour, descriptor)
        return self._segment[1]

    def _write_item(self, answer: Answer, row: int, probabilities: np.ndarray) -> bool:
        """One row of an answer as an item; False when capturing stopped instead."""
        image = isinstance(answer.inputs, bytes)
        item_id = answer.request_id if len(answer.logits) == 1 else f"{answer.request_id}-{row}"
        data = answer.inputs if image else _npy(answer.inputs[row])
        name = item_id + (_image_suffix(data) if image else ".npy")
        record = orjson.dumps({
            "id": item_id, "request_id": answer.request_id, "time": _iso(answer.time),
            "endpoint": answer.endpoint, "model": answer.model, "version": answer.version,
            "variant": answer.variant, "input": name, "input_kind": "image" if image else "tensor",
            "input_bytes": len(data), "classes": list(answer.classes),
            "predicted": answer.classes[int(probabilities.argmax())], "probabilities": probabilities,
            "features": None if answer.features is None else _encode_features(answer.features[row]),
            "preprocess": _preprocess(answer.contract),
        }, option=orjson.OPT_SERIALIZE_NUMPY)  # the arrays as they are: a Python float for each costs ten times more
        size = len(data) + len(record)
        if self.stats.bytes + size > self.settings.max_bytes:
            self._stop(BUDGET, f"the capture folder {self.folder} reached its budget of {self.settings.max_bytes} "
                               f"bytes (serving.capture.max_bytes)")
            return False
        try:
            segment = self._segment_folder(answer.time)
            _write_atomic(segment, name, data)
            _write_atomic(segment, item_id + RECORD_SUFFIX, record)  # last: the item is whole once it is there
        except OSError as error:
            self._stop(_stop_reason(error), f"writing to {self.folder} failed: {error}")
            return False
        with self._work:
            self.stats.captured += 1
            self.stats.bytes += size
        return True

    def _drop(self, reason: str, items: int) -> None:
        with self._work:
            self.stats.dropped[reason] += items

    def _stop(self, reason: str, why: str) -> None:
        """Stop capturing for good; said once, in the log and (stats.stopped) in /metrics."""
        with self._work:
            first, self.stats.stopped = self.stats.stopped is None, self.stats.stopped or reason
        if first:
            log.error("capture stopped (%s): %s; the server goes on serving without capturing", reason, why)

    # ------------------------------------------------------------ feedback

    def label(self, item_id: str, label: str) -> Path:
        """Store the true class of a captured item beside it, once. Raises InvalidItemId, UnknownItem, UnknownClass
        or DuplicateLabel (each says what is taken), OSError when the disk refuses. Blocks: not for the event loop."""
        if not ITEM_ID.fullmatch(item_id):
            raise InvalidItemId(f"request_id {item_id!r} is not one this server gives: the X-Request-Id of an answer "
                                f"(32 hex digits), with -ROW for a row of a V2 request with several")
        with self._written:  # an answer still queued is written first
            self._written.wait_for(lambda: item_id.split("-")[0] not in self._queued_ids, LABEL_WAIT_SECONDS)
        record_path = find_record(self.folder, item_id)
        item = None if record_path is None else read_item(record_path)
        if item is None:
            rows = find_record(self.folder, f"{item_id}-0")
            raise UnknownItem(
                f"request {item_id} had several rows: label each as {item_id}-ROW" if rows is not None else
                f"no captured item {item_id}: capture keeps a share of answers (serving.capture.sample "
                f"{self.settings.sample}), and none after it stopped")
        if label not in item.classes:
            raise UnknownClass(f"label {label!r} is not one of the model's classes: {', '.join(item.classes)}")
        data = orjson.dumps({"label": label, "time": _iso(time.time())})
        destination = record_path.with_name(item_id + LABEL_SUFFIX)
        temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")  # one a request
        _create(str(temporary), data)
        try:
            os.link(temporary, destination)  # fails if it exists: a label is created once, whole
        except FileExistsError:
            raise DuplicateLabel(f"{item_id} is labelled already ({_read_label(destination)!r}); a label is given "
                                 f"once") from None
        finally:
            temporary.unlink(missing_ok=True)
        with self._work:
            self.stats.bytes += len(data)
        return destination


# ------------------------------------------------------------ reading the folder (harvest, monitor)


def _segments(folder: Path) -> list[Path]:
    """The hour folders, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if SEGMENT.fullmatch(path.name) and path.is_dir())


def find_record(folder: Path, item_id: str) -> Path | None:
    """The record of item `item_id` (an ITEM_ID), newest segment first: feedback mostly follows its answer soon."""
    return next((path for segment in reversed(_segments(Path(folder)))
                 if (path := segment / (item_id + RECORD_SUFFIX)).is_file()), None)


def _read_label(path: Path) -> str | None:
    try:
        return orjson.loads(path.read_bytes())["label"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet (a label file is created whole, or not at all)
        return None


@dataclass(frozen=True)
class CapturedItem:
    """One whole captured item: its record (the JSON fields, see the module's doc), its input file, its label."""

    record: dict
    input_path: Path
    label: str | None

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.record["time"])

    @property
    def input_kind(self) -> str:
        return self.record["input_kind"]  # "image" | "tensor"

    @property
    def classes(self) -> list[str]:
        return self.record["classes"]

    @property
    def predicted(self) -> str:
        return self.record["predicted"]

    @property
    def probabilities(self) -> np.ndarray:
        return np.asarray(self.record["probabilities"], dtype=np.float64)

    @property
    def features(self) -> np.ndarray | None:
        """The model's penultimate features for this input (float32), None when the served file gave none."""
        features = self.record["features"]
        if isinstance(features, list):  # records written before features were stored as base64
            return np.asarray(features, dtype=np.float32)
        return None if features is None else np.frombuffer(base64.b64decode(features), "<f4")


def read_item(record_path: Path) -> CapturedItem | None:
    """The item whose record this is, or None when it is not whole (a record that does not parse, an input missing or
    not of the size its record states)."""
    try:
        record = orjson.loads(record_path.read_bytes())
        input_path = record_path.with_name(record["input"])
        if Path(record["input"]).name != record["input"] or input_path.stat().st_size != record["input_bytes"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CapturedItem(record, input_path, _read_label(record_path.with_name(record["id"] + LABEL_SUFFIX)))


def iter_items(folder: str | Path) -> Iterator[CapturedItem]:
    """Every whole captured item under `folder`, in the order they were captured; incomplete items (no record yet, or
    a torn one) and temporary files are skipped."""
    for segment in _segments(Path(folder)):
        records = (path for path in segment.iterdir() if path.name.endswith(RECORD_SUFFIX)
                   and not path.name.endswith(LABEL_SUFFIX) and not path.name.startswith("."))
        items = [item for path in records if (item := read_item(path)) is not None]
        yield from sorted(items, key=lambda item: (item.record["time"], item.id))
