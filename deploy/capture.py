"""Request capture and feedback: what the server answered, kept on disk for harvest (components/harvest.py) and drift
monitoring (`graft monitor`), and the true classes users send back for it.

Layout of serving.capture.folder (one segment an hour, UTC, of when the items were captured):

    <YYYY-MM-DD-HH>/<batch>.inputs         the inputs of one batch of items, one after the other: an uploaded image
                                           file's bytes as they arrived, or one V2 tensor row as a float32 .npy
                                           file's bytes; each followed by the item's penultimate features (float32)
    <YYYY-MM-DD-HH>/<batch>.jsonl          the batch's records, one line an item, written last: its presence means
                                           the batch is whole
    <YYYY-MM-DD-HH>/<item_id>.label.json   feedback {"label": CLASS, "time": ISO}, created once
    <YYYY-MM-DD-HH>/<batch>.shadow.jsonl   with serving.shadow on: what the shadow model predicted for answered
                                           requests, beside what was answered (deploy/shadow.py ShadowOutcome)

A batch is what the writer gathered in one wake-up (GATHER_SECONDS); its name starts with the capture time in
milliseconds, so names sort in time. An item id is the request id (uuid4 hex, returned to the client as X-Request-Id)
for a one-row request, and "<request_id>-<row>" for each row of a V2 request with several. A record's fields: id
(first), request_id, time (ISO 8601, UTC), endpoint, model, version, variant, input ({offset, bytes, suffix}: where
its bytes lie in the batch's .inputs and the file type they are, ".png", ".jpg", ... ".bin" when unknown, ".npy" for
a tensor row), input_kind ("image" | "tensor"), classes, predicted, probabilities, features ({offset, count, dtype}:
where they lie in the .inputs, "<f4"; null when the served file has none), preprocess (the model's contract: how a tensor row was
made from pixels). Both files of a batch are written under temporary names and renamed into place, the records last,
so a killed process leaves whole batches and at most stray temporary files (names starting with "."), which readers
skip; a record whose input lies beyond its .inputs file (cut short by a machine crash) is skipped too.

Serving never waits on the disk: `submit` queues the answer (dropping it, counted, when the bounded queue is full)
and one writer thread turns what gathered into one batch: two files, however many items. (An item a file pair cost
the server 10-34% of its throughput on this project's disk; see benchmarks/README.md, "Capture overhead".) At the
size budget, on a full disk or on any other write error capturing stops for good, says so once in the log (logger
graft.capture) and in /metrics, and the server goes on answering.
"""
from __future__ import annotations

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
INPUTS_SUFFIX, RECORDS_SUFFIX, LABEL_SUFFIX, TEMP_SUFFIX = ".inputs", ".jsonl", ".label.json", ".tmp"
SHADOW_SUFFIX = ".shadow.jsonl"
# The writer's backlog: beyond either bound an answer is dropped rather than held in memory.
QUEUE_ITEMS = 1024
QUEUE_BYTES = 64 * 2**20
# The writer wakes, waits this long for more answers to come, and writes them all as one batch: two files and one
# wake-up (a thread switch, the GIL handed over) for many answers instead of for each.
GATHER_SECONDS = 0.05
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
FEATURES_DTYPE = "<f4"  # as the model gave them: a float16 conversion cost the writer more than the bytes it saved
# Where the system has it (not macOS): capture's files leave the page cache once written (_leave_page_cache).
DROP_FROM_PAGE_CACHE = getattr(os, "POSIX_FADV_DONTNEED", None)
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


def item_id(request_id: str, row: int, rows: int) -> str:
    """A row's item id: the request id for a one-row request, "<request_id>-<row>" for each row of one with several."""
    return request_id if rows == 1 else f"{request_id}-{row}"


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
    probabilities: np.ndarray  # (rows, classes): the softmax the answer gave
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
    writer_cpu_seconds: float = 0.0  # the writer thread's CPU time so far
    shadow_records: int = 0  # shadow outcomes written (one a row)


def _image_suffix(blob: bytes) -> str:
    if blob[:4] == b"RIFF" and blob[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for signature, suffix in SIGNATURES if blob.startswith(signature)), ".bin")


def _write_all(descriptor: int, chunks: list) -> None:
    """`chunks` (bytes-like) written one after the other, IOV_MAX at a time: the kernel copies them without the
    GIL, and a batch costs a system call (a GIL hand-over), not one a chunk."""
    for start in range(0, len(chunks), IOV_MAX):
        group = chunks[start: start + IOV_MAX]
        written = os.writev(descriptor, group)
        if written < sum(memoryview(chunk).nbytes for chunk in group):  # a short write (rare): the rest, in bytes
            rest = memoryview(b"".join(group))[written:]
            while rest:
                rest = rest[os.write(descriptor, rest):]


def _leave_page_cache(descriptor: int) -> None:
    """Ask the kernel to drop the file's pages from the page cache: those still dirty have their writeback begun,
    the clean ones are dropped. Why: capture writes megabytes a second that nobody reads soon, and a growing page
    cache takes fresh pages, costly on a virtual machine (a first touch faults in the host): on this project's VMs
    storing a tensor item (21.6 kB) cost the machine 52-63 us through a growing page cache, 18-21 us with its pages
    dropped a batch after they were written, so that the next batches reuse them (benchmarks/capture_page_cache.py;
    benchmarks/README.md, "Capture overhead")."""
    if DROP_FROM_PAGE_CACHE is not None:
        os.posix_fadvise(descriptor, 0, 0, DROP_FROM_PAGE_CACHE)


def _create(name: str, chunks: list, dir_fd: int | None = None) -> int:
    """A new file `name` (in the folder `dir_fd` when given) holding `chunks` (bytes-like) one after the other, its
    writeback begun; its descriptor, open (`_leave_page_cache` once more when it is on disk, then close). Removed
    again if writing fails."""
    descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        _write_all(descriptor, chunks)
        _leave_page_cache(descriptor)
    except BaseException:
        os.close(descriptor)
        os.unlink(name, dir_fd=dir_fd)
        raise
    return descriptor


def _write_atomic(dir_fd: int, name: str, chunks: list) -> int:
    """`chunks` as file `name` in the folder `dir_fd`, as `_create` makes it (its descriptor returned, open): written
    under a temporary name, then renamed into place, so a reader never finds a half-written file under `name`.
    (Batch names are unique: so is the temporary name.)"""
    temporary = f".{name}{TEMP_SUFFIX}"
    descriptor = _create(temporary, chunks, dir_fd)
    try:
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.close(descriptor)
        os.unlink(temporary, dir_fd=dir_fd)
        raise
    return descriptor


def _folder_bytes(folder: Path) -> int:
    return sum((Path(root) / name).stat().st_size for root, _, names in os.walk(folder) for name in names)


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


@functools.lru_cache(maxsize=16)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy header of a float32 C-order array of `shape`: made once, not per row (np.save's cost is its header)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@functools.lru_cache(maxsize=16)
def _json(value: tuple | Contract | None) -> orjson.Fragment:
    """A record field that is the same for every answer of a model (its classes, its contract) as JSON, made once."""
    return orjson.Fragment(orjson.dumps(value.to_dict() if isinstance(value, Contract) else value))


def _stop_reason(error: OSError) -> str:
    return DISK_FULL if error.errno in (errno.ENOSPC, errno.EDQUOT) else WRITE_ERROR


@dataclass
class _Batch:
    """One batch's files as they are built: the .inputs file's chunks (bytes-like) and the records' lines."""

    inputs: list = field(default_factory=list)
    inputs_bytes: int = 0
    records: list[bytes] = field(default_factory=list)
    records_bytes: int = 0

    @property
    def size(self) -> int:
        return self.inputs_bytes + self.records_bytes


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
        self._shadow: deque[tuple[float, list[bytes]]] = deque()  # shadow records (time, lines), likewise
        self._queued_bytes = 0  # of the answers submitted and not yet written
        self._queued_ids: set[str] = set()  # their request ids
        self._closed = False
        self._segment: tuple[int, int] | None = None  # the writer's hour folder: (hours since 1970, open descriptor)
        # The files the writer wrote, open: those of the batch before leave the page cache after each batch.
        self._written_files: list[int] = []
        self._settling_files: list[int] = []
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
                self.stats.dropped[reason] += len(answer.probabilities)
                return False
            self._queue.append(answer)
            self._queued_bytes += size
            self._queued_ids.add(answer.request_id)
            self._work.notify()
        return True

    def submit_shadow(self, seconds: float, lines: list[bytes]) -> bool:
        """Queue a shadow outcome's records (deploy/shadow.py ShadowOutcome.records) of an answer given at `seconds`
        for the writer; False when they are not kept: capturing stopped, or the queue full."""
        with self._work:
            if self.stats.stopped or len(self._shadow) >= self.queue_items:
                return False
            self._shadow.append((seconds, lines))
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
                    self._work.wait_for(lambda: self._queue or self._shadow or self._closed)
                    if not (self._queue or self._shadow):
                        return  # closed, and everything written
                    closed = self._closed
                if not closed:
                    time.sleep(GATHER_SECONDS)
                with self._work:
                    answers, self._queue = self._queue, deque()
                    shadowed, self._shadow = self._shadow, deque()
                try:
                    self._write_batch(answers, shadowed)
                except Exception as error:  # whatever it was, the writer keeps going and the server keeps serving
                    log.exception("capture of %d answers failed: %s", len(answers), error)
                    # raised before the batch's files were written (their writing fails with OSError, handled there)
                    self._drop(WRITE_ERROR, sum(len(answer.probabilities) for answer in answers))
                self._settle(self._settling_files)
                self._settling_files, self._written_files = self._written_files, []
                with self._work:
                    for answer in answers:
                        self._queued_bytes -= answer.size
                        self._queued_ids.discard(answer.request_id)
                    self._written.notify_all()
                    self.stats.writer_cpu_seconds = time.thread_time()
        finally:
            self._settle(self._settling_files + self._written_files)
            if self._segment is not None:
                os.close(self._segment[1])

    @staticmethod
    def _settle(descriptors: list[int]) -> None:
        """Files written a batch ago (their writeback done by now): out of the page cache, and closed."""
        for descriptor in descriptors:
            _leave_page_cache(descriptor)
            os.close(descriptor)

    def _write_batch(self, answers: deque[Answer], shadowed: deque[tuple[float, list[bytes]]] = deque()) -> None:
        """The answers' rows as one batch of items, as many as the budget takes, the rest dropped (counted); then
        the shadow outcomes as the batch's shadow records."""
        batch, rows = _Batch(), sum(len(answer.probabilities) for answer in answers)
        for answer in answers:
            if not self._add_answer(batch, answer):
                break
        seconds = answers[0].time if answers else shadowed[0][0]
        name = f"{int(seconds * 1000):013d}-{os.urandom(4).hex()}"
        if batch.records and not self._write_files(batch, name, seconds):
            batch.records.clear()
        if rows > len(batch.records):
            self._drop(self.stats.stopped or WRITE_ERROR, rows - len(batch.records))
        lines = [line for _, records in shadowed for line in records]
        if lines and self._fits(sum(map(len, lines))):
            self._write_shadow(lines, name, seconds)

    def _add_answer(self, batch: _Batch, answer: Answer) -> bool:
        """An answer's rows added to the batch as items; False when the budget is reached first (the rows before it
        are in). Every item costs the writer's CPU, which the server's throughput pays for: what is the same for all
        rows is made once, the features stay float32 as served (float16 conversion was 2 us an item) and the time is
        a datetime orjson writes (isoformat was 2 us)."""
        rows, image = len(answer.probabilities), isinstance(answer.inputs, bytes)
        suffix = _image_suffix(answer.inputs) if image else ".npy"
        header = None if image else _npy_header(answer.inputs.shape[1:])
        common = {"request_id": answer.request_id, "time": datetime.fromtimestamp(answer.time, timezone.utc),
                  "endpoint": answer.endpoint, "model": answer.model, "version": answer.version,
                  "variant": answer.variant, "input_kind": "image" if image else "tensor",
                  "classes": _json(answer.classes), "preprocess": _json(answer.contract)}
        for row in range(rows):
            if image:
                chunks, input_size = [answer.inputs], len(answer.inputs)
            else:
                tensor = np.ascontiguousarray(answer.inputs[row], "<f4")
                chunks, input_size = [header, tensor], len(header) + tensor.nbytes
            features, features_size = None, 0
            if answer.features is not None:
                vector = np.ascontiguousarray(answer.features[row], FEATURES_DTYPE)
                chunks.append(vector)
                features = {"offset": batch.inputs_bytes + input_size, "count": len(vector), "dtype": FEATURES_DTYPE}
                features_size = vector.nbytes
            probabilities = answer.probabilities[row]
            record = orjson.dumps({
                "id": item_id(answer.request_id, row, rows), **common,
                "input": {"offset": batch.inputs_bytes, "bytes": input_size, "suffix": suffix},
                "predicted": answer.classes[int(probabilities.argmax())], "probabilities": probabilities,
                "features": features,
            }, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)  # arrays as they are: 10x cheaper
            if not self._fits(batch.size + input_size + features_size + len(record)):
                return False
            batch.inputs += chunks
            batch.inputs_bytes += input_size + features_size
            batch.records.append(record)
            batch.records_bytes += len(record)
        return True

    def _fits(self, size: int) -> bool:
        """Whether `size` more bytes fit the budget; capturing stops (said once) when they do not."""
        if self.stats.bytes + size <= self.settings.max_bytes:
            return True
        self._stop(BUDGET, f"the capture folder {self.folder} reached its budget of {self.settings.max_bytes} bytes "
                           f"(serving.capture.max_bytes)")
        return False

    def _segment_folder(self, seconds: float) -> int:
        """The open hour folder a batch begun at `seconds` goes to, made when the hour is new."""
        hour = int(seconds // 3600)
        if self._segment is None or self._segment[0] != hour:
            name = datetime.fromtimestamp(hour * 3600, timezone.utc).strftime(SEGMENT_FORMAT)
            (self.folder / name).mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.folder / name, os.O_RDONLY | os.O_DIRECTORY)
            if self._segment is not None:
                os.close(self._segment[1])
            self._segment = (hour, descriptor)
        return self._segment[1]

    def _write_files(self, batch: _Batch, name: str, seconds: float) -> bool:
        """The batch's two files, the records last; False when capturing stopped instead (nothing of it left).
        `name`: the batch's, its capture time (`seconds`) in milliseconds first (names sort in time), then random."""
        try:
            segment = self._segment_folder(seconds)
            inputs = _write_atomic(segment, name + INPUTS_SUFFIX, batch.inputs)
            try:
                records = _write_atomic(segment, name + RECORDS_SUFFIX, batch.records)  # last: the batch is whole now
            except BaseException:
                os.close(inputs)
                os.unlink(name + INPUTS_SUFFIX, dir_fd=segment)
                raise
            self._written_files += (inputs, records)
        except OSError as error:
            self._stop(_stop_reason(error), f"writing to {self.folder} failed: {error}")
            return False
        with self._work:
            self.stats.captured += len(batch.records)
            self.stats.bytes += batch.size
        return True

    def _write_shadow(self, lines: list[bytes], name: str, seconds: float) -> None:
        try:
            self._written_files.append(_write_atomic(self._segment_folder(seconds), name + SHADOW_SUFFIX, lines))
        except OSError as error:
            self._stop(_stop_reason(error), f"writing to {self.folder} failed: {error}")
            return
        with self._work:
            self.stats.shadow_records += len(lines)
            self.stats.bytes += sum(map(len, lines))

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
        item = find_item(self.folder, item_id)
        if item is None:
            raise UnknownItem(
                f"request {item_id} had several rows: label each as {item_id}-ROW"
                if find_item(self.folder, f"{item_id}-0") is not None else
                f"no captured item {item_id}: capture keeps a share of answers (serving.capture.sample "
                f"{self.settings.sample}), and none after it stopped")
        if label not in item.classes:
            raise UnknownClass(f"label {label!r} is not one of the model's classes: {', '.join(item.classes)}")
        data = orjson.dumps({"label": label, "time": iso_time(time.time())})
        destination = item.inputs_path.with_name(item_id + LABEL_SUFFIX)
        temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")  # one a request
        os.close(_create(str(temporary), [data]))
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


def _read_label(path: Path) -> str | None:
    try:
        return orjson.loads(path.read_bytes())["label"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet (a label file is created whole, or not at all)
        return None


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@dataclass(frozen=True)
class CapturedItem:
    """One whole captured item: its record (the JSON fields, see the module's doc), its batch's .inputs file, its
    label."""

    record: dict
    inputs_path: Path
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
    def input_suffix(self) -> str:
        return self.record["input"]["suffix"]  # ".png", ".jpg", ... ".bin"; ".npy" for a tensor row

    def input_bytes(self) -> bytes:
        """The input as a file's bytes: the upload as it arrived, or a tensor row as .npy."""
        return _read_range(self.inputs_path, self.record["input"]["offset"], self.record["input"]["bytes"])

    def tensor(self) -> np.ndarray:
        """A tensor item's input row, float32 (C, H, W), as the client sent it."""
        return np.load(io.BytesIO(self.input_bytes()), allow_pickle=False)

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
        """The model's penultimate features for this input (float32), None when
        the served file gave none."""
        features = self.record["features"]
        if features is None:
            return None
        dtype = np.dtype(features.get("dtype", "<f2"))  # float16 in captures written before December 2026
        data = _read_range(self.inputs_path, features["offset"], dtype.itemsize * features["count"])
        return np.frombuffer(data, dtype).astype(np.float32)


def _end(record: dict) -> int:
    """Where the item's data ends in its .inputs file."""
    features = record["features"]
    end = record["input"]["offset"] + record["input"]["bytes"]
    if features is None:
        return end
    return max(end, features["offset"] + np.dtype(features.get("dtype", "<f2")).itemsize * features["count"])


def _items(records_path: Path, lines: list[bytes], labels: set[str] | None) -> list[CapturedItem]:
    """The whole items of these record lines of one batch (a line that does not parse, or whose data lies beyond
    the .inputs file, is not whole); `labels`: the label files' names in the segment (None: look each up)."""
    inputs_path = records_path.with_name(records_path.name[: -len(RECORDS_SUFFIX)] + INPUTS_SUFFIX)
    try:
        size = inputs_path.stat().st_size
    except OSError:
        return []
    items = []
    for line in lines:
        try:
            record = orjson.loads(line)
            if not ITEM_ID.fullmatch(record["id"]) or _end(record) > size:
                continue
        except (ValueError, KeyError, TypeError):
            continue
        label_name = record["id"] + LABEL_SUFFIX
        label = _read_label(records_path.with_name(label_name)) if labels is None or label_name in labels else None
        items.append(CapturedItem(record, inputs_path, label))
    return items


def _records_files(segment: Path, names: list[str], suffix: str = RECORDS_SUFFIX) -> list[Path]:
    """The segment's whole files of captured records (`suffix`: of shadow records), oldest first."""
    return [segment / name for name in sorted(names) if name.endswith(suffix) and not name.startswith(".")
            and (suffix == SHADOW_SUFFIX or not name.endswith(SHADOW_SUFFIX))]


def find_item(folder: str | Path, item_id: str) -> CapturedItem | None:
    """The whole captured item `item_id` (an ITEM_ID), newest batches first: feedback mostly follows its answer soon.
    Reads record files (small: inputs and features live in the .inputs files) until it is found."""
    needle = b'{"id":"' + item_id.encode() + b'"'
    for segment in reversed(_segments(Path(folder))):
        for path in reversed(_records_files(segment, os.listdir(segment))):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if (at := data.find(needle)) >= 0:
                end = data.find(b"\n", at)
                items = _items(path, [data[at: None if end < 0 else end]], None)
                return items[0] if items else None
    return None


def iter_items(folder: str | Path) -> Iterator[CapturedItem]:
    """Every whole captured item under `folder`, in the order they were captured; incomplete batches (no records
    yet, or torn) and temporary files are skipped."""
    for segment in _segments(Path(folder)):
        names = os.listdir(segment)
        labels = {name for name in names if name.endswith(LABEL_SUFFIX)}
        for path in _records_files(segment, names):
            try:
                lines = path.read_bytes().splitlines()
            except OSError:
                continue
            yield from _items(path, lines, labels)


def iter_shadow_records(folder: str | Path) -> Iterator[dict]:
    """Every shadow record under `folder` (deploy/shadow.py ShadowOutcome.records), in the order they were written;
    a line that does not parse (a torn last line) is skipped."""
    for segment in _segments(Path(folder)):
        for path in _records_files(segment, os.listdir(segment), SHADOW_SUFFIX):
            try:
                lines = path.read_bytes().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    yield orjson.loads(line)
                except ValueError:
                    continue


def read_labels(folder: str | Path) -> dict[str, str]:
    """Every feedback label under `folder`: item id -> class."""
    labels = {}
    for segment in _segments(Path(folder)):
        for name in os.listdir(segment):
            if name.endswith(LABEL_SUFFIX) and not name.startswith(".") and (label := _read_label(segment / name)):
                labels[name[: -len(LABEL_SUFFIX)]] = label
    return labels
