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
classes, predicted, probabilities, features (null until the served model gives them), preprocess (the model's
contract: how a tensor row was made from pixels). Every file is written under a temporary name in its segment and
renamed into place, so a killed writer leaves whole files and at most stray temporary ones (names starting with "."),
which readers skip. The record states its input's size: an input cut short by a machine crash (renamed before its
data reached the disk) is found and skipped too.

Serving never waits on the disk, and never shares its interpreter with the writing. `submit` queues the answer
(dropping it, counted, when the bounded queue is full); a feeder thread hands what gathered to a writer process
(`python -m deploy.capture`) in one pipe write, and that process makes the files. Written by a thread of the server
instead, each item's eight file system calls handed the GIL back and forth with the event loop: capturing every
request cost 8-15% of throughput before a byte reached the disk (benchmarks/README.md, "Capture overhead"). At the
size budget, on a full disk or on any other write error capturing stops for good, says so once in the server's log
(logger graft.capture) and in /metrics, and the server goes on answering. A server killed mid-stream loses only
what had not reached the pipe: the writer process writes what it has read, then ends.
"""
from __future__ import annotations

import errno
import functools
import io
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson

from deploy.contract import Contract
from deploy.settings import CaptureSettings

log = logging.getLogger("graft.capture")

ITEM_ID = re.compile(r"[0-9a-f]{32}(?:-[0-9]{1,6})?")  # what `label` accepts: no path can hide in it
SEGMENT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}-[0-9]{2}")
SEGMENT_FORMAT = "%Y-%m-%d-%H"
RECORD_SUFFIX, LABEL_SUFFIX, TEMP_SUFFIX = ".json", ".label.json", ".tmp"
# The backlog (queued, in the pipe, being written): beyond either bound an answer is dropped rather than held.
QUEUE_ITEMS = 1024
QUEUE_BYTES = 64 * 2**20
# The feeder wakes, waits this long for more answers to come, and hands them all over in one write: one wake-up
# (a thread switch, the GIL handed over) for many answers instead of one for each.
GATHER_SECONDS = 0.05
PIPE_BYTES = 2**20  # the pipe to the writer holds a batch or more: fewer switches between the two processes
LABEL_WAIT_SECONDS = 10.0  # feedback for an answer not yet written waits this long for it
LENGTH = struct.Struct(">I")  # a frame to the writer process: its header's length, the JSON header, the arrays' bytes

BUDGET, DISK_FULL, WRITE_ERROR, QUEUE_FULL = "budget", "disk_full", "write_error", "queue_full"
STOP_REASONS = (BUDGET, DISK_FULL, WRITE_ERROR)  # capturing stopped for good
DROP_REASONS = (QUEUE_FULL, *STOP_REASONS)  # why an answer was not captured
# The image formats a captured upload is named by, from the file's first bytes (WebP: "RIFF", size, "WEBP").
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
              (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def new_request_id() -> str:
    return uuid.uuid4().hex


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
    """One answered request as the server hands it over: kept as it was, the writer process does the rest."""

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
    bytes: int = 0  # the capture folder's size as far as the writer knows (scanned at its start, then counted)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))  # items, by reason
    stopped: str | None = None  # a STOP_REASONS entry once capturing stopped
    why: str = ""  # what stopped it


def _stop_reason(error: OSError) -> str:
    return DISK_FULL if error.errno in (errno.ENOSPC, errno.EDQUOT) else WRITE_ERROR


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def _create(name: str | Path, data: bytes, dir_fd: int | None = None) -> None:
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


# ------------------------------------------------------------ the frames the server sends the writer process


@functools.lru_cache(maxsize=16)
def _preprocess(contract: Contract | None) -> dict | None:
    return None if contract is None else contract.to_dict()


def _frame(answer: Answer) -> list[bytes]:
    """An answer as the writer process reads it: small work, done on the server's feeder thread."""
    image = isinstance(answer.inputs, bytes)
    arrays = [np.ascontiguousarray(answer.logits, "<f4").tobytes(),
              b"" if answer.features is None else np.ascontiguousarray(answer.features, "<f4").tobytes(),
              answer.inputs if image else np.ascontiguousarray(answer.inputs, "<f4").tobytes()]
    header = orjson.dumps({
        "request_id": answer.request_id, "endpoint": answer.endpoint, "model": answer.model,
        "version": answer.version, "variant": answer.variant, "classes": answer.classes, "time": answer.time,
        "preprocess": _preprocess(answer.contract), "logits": answer.logits.shape,
        "features": None if answer.features is None else answer.features.shape,
        "input": None if image else answer.inputs.shape, "sizes": [len(a) for a in arrays],
    })
    return [LENGTH.pack(len(header)), header, *arrays]


def _marker(batch: int) -> bytes:
    """The end of a batch: the writer reports on everything before it."""
    header = orjson.dumps({"batch": batch})
    return LENGTH.pack(len(header)) + header


def _read_frame(stream: BinaryIO) -> tuple[dict, list[bytes]] | None:
    """The next frame (its header, its arrays' bytes), None at the end of the stream."""
    length = stream.read(LENGTH.size)
    if len(length) < LENGTH.size:
        return None
    header = orjson.loads(stream.read(LENGTH.unpack(length)[0]))
    return header, [stream.read(size) for size in header.get("sizes", ())]


# ------------------------------------------------------------ the writer process: python -m deploy.capture


def _image_suffix(blob: bytes) -> str:
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for signature, suffix in SIGNATURES if blob.startswith(signature)), ".bin")


@functools.lru_cache(maxsize=16)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a float32 C-order array of `shape`: made once, not for every row (np.save's cost)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


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


class _Writer:
    """The writer process's state: the folder, its budget, what was written, and the hour folder open now."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.stats = CaptureStats()
        self._segment: tuple[int, int] | None = None  # (hours since 1970, the hour folder's open descriptor)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.stats.bytes = _folder_bytes(folder)
        except OSError as error:
            self._stop(_stop_reason(error), f"cannot use the capture folder {folder}: {error}")

    def _stop(self, reason: str, why: str) -> None:
        if self.stats.stopped is None:
            self.stats.stopped, self.stats.why = reason, why

    def write(self, header: dict, arrays: list[bytes]) -> None:
        """One answer's rows as items, each whole or not at all; the rest dropped once capturing stopped."""
        logits = np.frombuffer(arrays[0], "<f4").reshape(header["logits"])
        features = None if header["features"] is None else np.frombuffer(arrays[1], "<f4").reshape(header["features"])
        inputs = arrays[2] if header["input"] is None else np.frombuffer(arrays[2], "<f4").reshape(header["input"])
        probabilities = _softmax(logits.astype(np.float64))
        rows = len(logits)
        for row in range(rows):
            if self.stats.stopped or not self._write_item(header, row, probabilities[row], inputs, features, rows):
                self.stats.dropped[self.stats.stopped] += rows - row
                return

    def _write_item(self, header: dict, row: int, probabilities: np.ndarray, inputs: bytes | np.ndarray,
                    features: np.ndarray | None, rows: int) -> bool:
        image = isinstance(inputs, bytes)
        item_id = header["request_id"] if rows == 1 else f"{header['request_id']}-{row}"
        data = inputs if image else _npy_header(inputs.shape[1:]) + inputs[row].tobytes()
        name = item_id + (_image_suffix(data) if image else ".npy")
        classes = header["classes"]
        record = orjson.dumps({
            "id": item_id, "request_id": header["request_id"], "time": _iso(header["time"]),
            "endpoint": header["endpoint"], "model": header["model"], "version": header["version"],
            "variant": header["variant"], "input": name, "input_kind": "image" if image else "tensor",
            "input_bytes": len(data), "classes": classes, "predicted": classes[int(probabilities.argmax())],
            "probabilities": probabilities.tolist(), "features": None if features is None else features[row].tolist(),
            "preprocess": header["preprocess"],
        })
        size = len(data) + len(record)
        if self.stats.bytes + size > self.max_bytes:
            self._stop(BUDGET, f"the capture folder {self.folder} reached its budget of {self.max_bytes} bytes "
                               f"(serving.capture.max_bytes)")
            return False
        try:
            segment = self._segment_folder(header["time"])
            _write_atomic(segment, name, data)
            _write_atomic(segment, item_id + RECORD_SUFFIX, record)  # last: the item is whole once it is there
        except OSError as error:
            self._stop(_stop_reason(error), f"writing to {self.folder} failed: {error}")
            return False
        self.stats.captured += 1
        self.stats.bytes += size
        return True

    def _segment_folder(self, seconds: float) -> int:
        """The open hour folder an answer given at `seconds` goes to, made when the hour is new."""
        hour = int(seconds // 3600)
        if self._segment is None or self._segment[0] != hour:
            path = self.folder / datetime.fromtimestamp(hour * 3600, timezone.utc).strftime(SEGMENT_FORMAT)
            path.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            if self._segment is not None:
                os.close(self._segment[1])
            self._segment = (hour, descriptor)
        return self._segment[1]


def main(argv: list[str] | None = None) -> None:
    """The writer process: frames from stdin, files in FOLDER, a JSON line on stdout after each batch. It ends at
    the end of its input, having written everything it read (a server killed mid-stream loses nothing it sent)."""
    folder, max_bytes = (argv or sys.argv[1:])[:2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C stops the server, which then ends this by closing the pipe
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    writer = _Writer(Path(folder), int(max_bytes))
    stdin, stdout = os.fdopen(sys.stdin.fileno(), "rb", buffering=PIPE_BYTES), sys.stdout.buffer
    while (frame := _read_frame(stdin)) is not None:
        header, arrays = frame
        if "batch" in header:
            report = {**writer.stats.__dict__, "batch": header["batch"]}
            stdout.write(orjson.dumps(report) + b"\n")
            stdout.flush()
            continue
        try:
            writer.write(header, arrays)
        except Exception as error:  # whatever it was, the writer keeps going and the server keeps serving
            log.exception("capture of request %s failed: %s", header.get("request_id"), error)


# ------------------------------------------------------------ the server's side


class CaptureStore:
    """The capture folder of one server: `submit` (cheap, never blocking) from the event loop, `label` from a
    worker thread, `stats` for /metrics; the writing is the writer process's."""

    def __init__(self, settings: CaptureSettings, queue_items: int = QUEUE_ITEMS, queue_bytes: int = QUEUE_BYTES) -> None:
        self.settings, self.folder = settings, Path(settings.folder)
        self.queue_items, self.queue_bytes = queue_items, queue_bytes
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the feeder waits here for answers
        self._written = threading.Condition(lock)  # feedback waits here for an answer not yet written
        self._queue: deque[Answer] = deque()  # submitted, not yet taken by the feeder
        self._pending: dict[int, list[Answer]] = {}  # batches sent, by number, until the writer reports on them
        self._queued_bytes = 0  # of the answers submitted and not yet reported written
        self._queued_ids: set[str] = set()  # their request ids
        self._closed = False
        self._own_drops = dict.fromkeys(DROP_REASONS, 0)  # answers this side dropped (the writer counts its own)
        self._written_stats = CaptureStats()  # the writer's last report
        self._label_bytes = 0
        self._stopped: tuple[str, str] | None = None  # (reason, why) once capturing stopped
        # The writer imports deploy as this process does, wherever the server runs from.
        package_root = str(Path(__file__).resolve().parents[1])
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                                 os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen([sys.executable, "-m", "deploy.capture", str(self.folder),
                                          str(settings.max_bytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env=environment)
        try:  # Linux: a larger pipe than its 64 kB
            import fcntl

            fcntl.fcntl(self._process.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
        except OSError:  # over the system's pipe-max-size: the default pipe works, with more switches
            pass
        self._feeder = threading.Thread(target=self._feed, name="graft-capture-feeder", daemon=True)
        self._reader = threading.Thread(target=self._read_reports, name="graft-capture-reports", daemon=True)
        self._feeder.start()
        self._reader.start()

    @property
    def stats(self) -> CaptureStats:
        with self._work:
            written = self._written_stats
            return CaptureStats(written.captured, written.bytes + self._label_bytes,
                                {r: written.dropped[r] + self._own_drops[r] for r in DROP_REASONS},
                                self._stopped and self._stopped[0], self._stopped[1] if self._stopped else "")

    def sampled(self) -> bool:
        return self.settings.sample >= 1.0 or random.random() < self.settings.sample

    def submit(self, answer: Answer) -> bool:
        """Queue an answer for the writer; False when it is dropped (counted): capturing stopped, or the queue full."""
        size = answer.size
        with self._work:
            reason = (self._stopped[0] if self._stopped else
                      QUEUE_FULL if len(self._queued_ids) >= self.queue_items or self._queued_bytes + size > self.queue_bytes
                      else None)
            if reason is not None:
                self._own_drops[reason] += len(answer.logits)
                return False
            self._queue.append(answer)
            self._queued_bytes += size
            self._queued_ids.add(answer.request_id)
            self._work.notify()
        return True

    def close(self, seconds: float = 10.0) -> None:
        """Hand over what is queued and let the writer finish it (for at most `seconds`), then end it."""
        with self._work:
            self._closed = True
            self._work.notify()
        self._feeder.join(seconds)
        try:
            self._process.wait(seconds)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._reader.join(seconds)

    def _stop(self, reason: str, why: str) -> None:
        """Stop capturing for good; said once, in the log and (stats.stopped) in /metrics."""
        with self._work:
            first = self._stopped is None
            self._stopped = self._stopped or (reason, why)
        if first:
            log.error("capture stopped (%s): %s; the server goes on serving without capturing", reason, why)

    def _feed(self) -> None:
        """Hand what gathered to the writer process, one write for a batch; close its input at the end."""
        batch_number = 0
        try:
            while True:
                with self._work:
                    self._work.wait_for(lambda: self._queue or self._closed)
                    if not self._queue:
                        return  # closed, and everything handed over
                    closed = self._closed
                if not closed:
                    time.sleep(GATHER_SECONDS)
                with self._work:
                    batch, self._queue = list(self._queue), deque()
                    batch_number += 1
                    self._pending[batch_number] = batch
                self._process.stdin.write(b"".join([part for answer in batch for part in _frame(answer)]
                                                   + [_marker(batch_number)]))
                self._process.stdin.flush()
        except OSError as error:  # the writer process ended: nothing more can be captured
            self._stop(WRITE_ERROR, f"the capture writer process ended ({error})")
        finally:
            try:
                self._process.stdin.close()
            except OSError:
                pass

    def _read_reports(self) -> None:
        """The writer's reports: counts for /metrics, a stop to say once, and answers written (feedback waits on)."""
        for line in self._process.stdout:
            report = orjson.loads(line)
            with self._work:
                self._written_stats = CaptureStats(report["captured"], report["bytes"], report["dropped"])
                for answer in self._pending.pop(report["batch"], []):
                    self._queued_bytes -= answer.size
                    self._queued_ids.discard(answer.request_id)
                self._written.notify_all()
            if report["stopped"]:
                self._stop(report["stopped"], report["why"])
        if not self._closed:
            self._stop(WRITE_ERROR, f"the capture writer process ended (exit status {self._process.wait()})")
        with self._work:  # nothing more will be written: feedback stops waiting
            self._queued_ids.clear()
            self._written.notify_all()

    # ------------------------------------------------------------ feedback

    def label(self, item_id: str, label: str) -> Path:
        """Store the true class of a captured item beside it, once. Raises InvalidItemId, UnknownItem, UnknownClass
        or DuplicateLabel (each says what is taken), OSError when the disk refuses. Blocks: not for the event loop."""
        if not ITEM_ID.fullmatch(item_id):
            raise InvalidItemId(f"request_id {item_id!r} is not one this server gives: the X-Request-Id of an answer "
                                f"(32 hex digits), with -ROW for a row of a V2 request with several")
        with self._written:  # an answer not yet written is waited for
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
        _create(temporary, data)
        try:
            os.link(temporary, destination)  # fails if it exists: a label is created once, whole
        except FileExistsError:
            raise DuplicateLabel(f"{item_id} is labelled already ({_read_label(destination)!r}); a label is given "
                                 f"once") from None
        finally:
            temporary.unlink(missing_ok=True)
        with self._work:
            self._label_bytes += len(data)
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
        features = self.record["features"]
        return None if features is None else np.asarray(features, dtype=np.float32)


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


if __name__ == "__main__":
    main()
