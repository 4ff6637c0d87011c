"""The Graft model server: KServe/Triton V2 inference protocol, /predict for image files, /feedback, /metrics, a page
at /.

It serves the model behind a registry alias, batches concurrent requests, and follows the alias: when it
moves (promote, rollback) the new version is loaded beside the old one, warmed up and switched in with one
reference swap at the move's scheduled moment (every server at once; canary shares likewise). A request is answered entirely by the version it started on; none is dropped. Every answer carries
its request id (X-Request-Id); with serving.capture on, a sampled share of answers is kept (deploy/capture.py) and
POST /feedback takes their true classes.

Run: `graft serve` (reads params.yaml), or in a container `python -m deploy.server --tracking-uri ...`. Both take
their settings from deploy/settings.py's ServingSettings: params.yaml's `serving`, one option per field, and for
`python -m deploy.server` one environment variable per field (GRAFT_MAX_BATCH_SIZE for --max-batch-size).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import random
import re
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.background import BackgroundTask
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from deploy.batching import BatcherClosed, DynamicBatcher
from deploy.budget import CpuBudget
from deploy.canary import KEY_HEADER_NOTE, CanaryRoute, parse_share
from deploy.contract import Contract
from deploy.drift import DriftMonitor, DriftResult
from deploy.capture import (
    DROP_REASONS,
    STOP_REASONS,
    Answer,
    CaptureError,
    CaptureStore,
    DuplicateLabel,
    InvalidItemId,
    UnknownClass,
    UnknownItem,
    item_id,
    new_request_id,
)
from deploy.model import (
    InputError,
    LoadedModel,
    ModelLoadError,
    PayloadTooLarge,
    declared_pixels,
    decode_image,
    engine_cache,
    load_model,
    planned_provider,
    softmax,
)
from deploy.page import render_page
from deploy.settings import (
    CACHE_VARIABLE,
    MODEL_VARIABLE,
    TOKEN_VARIABLE,
    ServingSettings,
    SettingsError,
    add_options,
    default_cache_dir,
    serving_from,
    variables,
)
from deploy.shadow import DROP_REASONS as SHADOW_DROP_REASONS
from deploy.shadow import OVER_BUDGET, ShadowJob, ShadowOutcome, ShadowQueue, predicted_classes
from deploy.tags import CANARY_SHARE_TAG, CARD_MISTAKES, TRAFFIC_AT_TAG
from deploy.source import FileSource, IntegrityError, ModelCard, RegistrySource, RegistryUnreachable, SourceError
from deploy.v2 import (
    UNSUPPORTED_EXTENSIONS,
    NotServable,
    bearer_matches,
    max_infer_rows,
    model_config,
    model_metadata as v2_model_metadata,
    parse_json_infer,
    server_metadata as v2_server_metadata,
    split_binary,
    unsupported,
    wants_binary_output,
)
from deploy.variants import VariantError, choose_variant
from deploy import v2_grpc

log = logging.getLogger("graft.serve")
T = TypeVar("T")
disable_created_metrics()  # the *_created series double /metrics for no use here
TRACKING_VARIABLE = "MLFLOW_TRACKING_URI"
DEFAULT_MODEL = "graft-classifier"


def environment_variables() -> set[str]:
    """Every environment variable `python -m deploy.server` reads: one per serving setting, and the rest."""
    return {*variables().values(), TRACKING_VARIABLE, MODEL_VARIABLE, CACHE_VARIABLE, TOKEN_VARIABLE}


@dataclass(frozen=True)
class ServerSettings:
    """What one server runs with: the serving settings (params.yaml's `serving`, or the command line and
    environment of `python -m deploy.server`), and what is not one of them."""

    serving: ServingSettings = field(default_factory=ServingSettings)
    model_name: str = DEFAULT_MODEL
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))
    token: str = field(default="", repr=False)  # when set, every endpoint but /v2/health/* needs "Bearer <token>"
    warmup_rounds: int = 3
    decode_workers: int = 2  # threads that parse bodies and decode images, off the event loop


def _load_variant(source: FileSource | RegistrySource, version: str, provider: str, available: list[str],
                  settings: ServerSettings, threads: int) -> tuple[LoadedModel, dict[str, str]]:
    serving = settings.serving
    try:
        variant, why = choose_variant(serving.variant, provider, available)
    except VariantError as error:
        raise ModelLoadError(f"v{version}: {error}") from None
    resolved = source.fetch(version, variant)
    model = load_model(resolved.onnx_path, list(serving.providers), serving.strict, engine_cache(settings.cache_dir),
                       threads)
    model.variant, model.variant_note = variant, f"{variant} ({why})"
    return model, resolved.tags


def load_version(source: FileSource | RegistrySource, version: str, settings: ServerSettings,
                 threads: int) -> tuple[LoadedModel, dict[str, str]]:
    """`version` as this server runs it, warm: the export variant that suits the provider that runs (should a GPU
    provider fail to start, the variant that suits the one running instead), and its registry tags. `graft predict`
    loads through here too, so files are scored by what `graft serve` would serve."""
    available = source.variants(version)
    planned = planned_provider(list(settings.serving.providers), engine_cache(settings.cache_dir))
    model, tags = _load_variant(source, version, planned, available, settings, threads)
    if model.provider != planned:  # a GPU provider failed to start: serve the variant that fits what runs
        model, tags = _load_variant(source, version, model.provider, available, settings, threads)
    warm = np.zeros((settings.serving.max_batch_size, *model.contract.shape), np.float32)
    for _ in range(settings.warmup_rounds):  # first calls allocate and (on TensorRT) build engines
        model.run(warm[:1])
        model.run(warm)
    return model, tags


@dataclass
class Served:
    """One loaded version and its batcher: a request holds one of these from start to end."""

    version: str
    model: LoadedModel
    batcher: DynamicBatcher
    tags: dict[str, str] = field(default_factory=dict)
    drift: DriftMonitor | None = None  # its answers' features against its file's reference; None: the file has none
    route: str = "champion"  # how requests reach it: champion (the alias served) | canary (serving.canary) | pinned
    #                          (asked for by number: /v2/models/NAME/versions/V)
    card: ModelCard | None = None  # its model card, fetched when the page first asks (ModelServer.card_of)
    card_fetched: bool = False

    def monitor(self, outputs: np.ndarray) -> None:
        """A batch's outputs (run_served's rows), in its batcher's thread: their features and probabilities go to the
        drift monitor, once a batch, off the event loop (once a request on the loop cost about 13 us a request)."""
        if self.drift is not None and self.model.has_features:
            logits, features = self.model.split(outputs)
            self.drift.add(features, softmax(logits))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("graft_requests_total", "HTTP requests", ["endpoint", "code"], registry=r)
        self.errors = Counter("graft_request_errors_total", "requests answered with an error", ["endpoint", "reason"], registry=r)
        self.latency = Histogram("graft_request_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.batch_size = Histogram("graft_batch_size", "rows per model execution", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.model_seconds = Histogram("graft_model_execution_seconds", "time inside ONNX Runtime per execution", registry=r,
                                       buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
        # With one intra-op thread ONNX Runtime runs in the calling thread, so this is all of the model's CPU; with
        # more, its pool threads' CPU is not in it.
        self.model_cpu_seconds = Counter("graft_model_cpu_seconds_total", "CPU time of the thread calling ONNX Runtime, "
                                         "over its executions", registry=r)
        self.inferences = Counter("graft_inferences_total", "rows inferred", registry=r)
        self.executions = Counter("graft_executions_total", "model executions (batches)", registry=r)
        self.queue_depth = Gauge("graft_queue_depth", "requests waiting for a batch", registry=r)
        self.model_info = Gauge("graft_model_info", "the served model version, the provider running it and the export variant",
                                ["model", "version", "provider", "variant"], registry=r)
        self.reloads = Counter("graft_model_reloads_total", "alias moves followed", ["outcome"], registry=r)
        self.switch_late = Gauge("graft_traffic_switch_late_seconds", "how long after its scheduled moment the last "
                                 "alias move or canary share change took effect here (0: on time)", registry=r)
        self.refused = Counter("graft_model_refused_total", "versions refused: their file is not the registered one",
                               ["model", "version"], registry=r)
        self.feedback = Counter("graft_feedback_total", "feedback requests, by outcome", ["outcome"], registry=r)
        self.answers = Counter("graft_answers_total", "inference requests answered, by the version that answered and "
                               "its route (champion | canary | pinned: asked for by number)", ["version", "route"], registry=r)
        self.canary_share = Gauge("graft_canary_share_percent", "the share of requests the canary answers (0: none: "
                                  "no share set, no canary version, or the canary is the champion)", registry=r)
        self.canary_info = Gauge("graft_canary_info", "the canary alias and the version it answers with (none: no "
                                 "canary)", ["alias", "version"], registry=r)
        # The drift test of each full window of answers against the served file's reference (deploy/drift.py).
        self.drift_window = Gauge("graft_drift_window_size", "answers a drift test compares with the reference", registry=r)
        self.drift_level = Gauge("graft_drift_level", "a window whose p-value is below this is drift", registry=r)
        self.drift_windows = Counter("graft_drift_windows_total", "windows tested", registry=r)
        self.drift_alarms = Counter("graft_drift_alarms_total", "windows whose p-value was below the level", registry=r)
        self.drift_p_value = Gauge("graft_drift_p_value", "the latest window's MMD permutation p-value", registry=r)
        self.drift_statistic = Gauge("graft_drift_statistic", "the latest window's MMD^2 against the reference", registry=r)
        self.drift_class_shift = Gauge("graft_drift_class_shift", "total variation of the latest window's predicted "
                                       "classes from the reference's", registry=r)
        self.drift_confidence = Gauge("graft_drift_mean_confidence", "the latest window's mean top probability, "
                                      "and the reference's", ["sample"], registry=r)

    def on_drift_test(self, result: DriftResult) -> None:
        self.drift_windows.inc()
        self.drift_alarms.inc(result.drifted)
        self.drift_p_value.set(result.p_value)
        self.drift_statistic.set(result.statistic)
        self.drift_class_shift.set(result.class_tv_reference)
        self.drift_confidence.labels("window").set(result.mean_confidence)
        self.drift_confidence.labels("reference").set(result.reference_mean_confidence)

    def on_batch(self, rows: int, seconds: float, cpu_seconds: float) -> None:
        self.batch_size.observe(rows)
        self.model_seconds.observe(seconds)
        self.model_cpu_seconds.inc(cpu_seconds)
        self.inferences.inc(rows)
        self.executions.inc()


class ShadowMetrics:
    """The shadow's counts (serving.shadow on): what it was offered, how it compared, and, as feedback labels arrive
    for shadowed requests, which of the two models was right."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("graft_shadow_requests_total", "answered requests sampled for the shadow, by outcome "
                                "(compared, or why not)", ["outcome"], registry=r)
        # Each outcome's series looked up once: over_budget is counted on the answering path, under heavy traffic
        # for most answers.
        self.outcomes = {outcome: self.requests.labels(outcome) for outcome in ("compared", *SHADOW_DROP_REASONS)}
        self.rows = Counter("graft_shadow_rows_total", "rows the shadow compared", registry=r)
        self.agreements = Counter("graft_shadow_agreements_total", "compared rows where the shadow predicted the class "
                                  "that was answered", registry=r)
        self.latency = Histogram("graft_shadow_model_latency_seconds", "model latency on the shadowed requests, "
                                 "of the model that answered (served) and of the shadow", ["model"], registry=r,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
        self.labelled = Counter("graft_shadow_labelled_total", "feedback labels for shadowed rows, by whether the "
                                "served model and the shadow were right", ["served", "shadow"], registry=r)
        self.model_info = Gauge("graft_shadow_model_info", "the shadowed alias and version (none: the alias does not "
                                "exist, or names the served version)", ["alias", "version"], registry=r)


class CaptureCollector:
    """The capture store's counts, read at each scrape: the store's writer thread never touches a metric."""

    def __init__(self, store: CaptureStore) -> None:
        self.store = store

    def collect(self):
        stats = self.store.stats
        yield CounterMetricFamily("graft_captured", "answers captured (items: one per row)", value=stats.captured)
        dropped = CounterMetricFamily("graft_capture_dropped", "answers sampled but not captured (items), by why",
                                      labels=["reason"])
        for reason in DROP_REASONS:
            dropped.add_metric([reason], stats.dropped[reason])
        yield dropped
        yield GaugeMetricFamily("graft_capture_bytes", "the capture folder's size in bytes", value=stats.bytes)
        yield CounterMetricFamily("graft_capture_writer_cpu_seconds", "CPU time the capture writer thread used: what "
                                  "capturing costs the server, beside the request path's queueing",
                                  value=stats.writer_cpu_seconds)
        yield CounterMetricFamily("graft_capture_shadow_records", "shadow outcomes written (one a row), the evidence "
                                  "`graft shadow report` reads", value=stats.shadow_records)
        stopped = GaugeMetricFamily("graft_capture_stopped", "1 once capturing stopped (budget, full disk, write error)",
                                    labels=["reason"])
        for reason in STOP_REASONS:
            stopped.add_metric([reason], float(stats.stopped == reason))
        yield stopped


SHADOW_RECENT_ITEMS = 100_000  # shadowed items remembered for /metrics' labelled counts (the report reads the files)
SWITCH_ON_TIME_SECONDS = 0.05  # a switch this close after its scheduled moment is on time


@dataclass(frozen=True)
class Inferred:
    """A request run by the served version: the rows it ran, their logits and features (None when the file has no
    features output), the version, and the model latency (from its batcher's queue to the outputs)."""

    rows: np.ndarray
    logits: np.ndarray
    features: np.ndarray | None
    served: Served
    seconds: float


class ModelServer:
    """Holds the served version, loads new ones, and answers requests."""

    def __init__(self, source: FileSource | RegistrySource, settings: ServerSettings) -> None:
        self.source, self.settings = source, settings
        self.metrics = Metrics()
        self.served: Served | None = None
        self.ready = False
        self._answers: dict[tuple[str, str], Counter] = {}  # (version, route) -> its answers series, looked up once
        self._reloader: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()
        self._refused: set[str] = set()  # versions whose file failed its hash check: not tried again
        # Decoding a large image or parsing a large JSON tensor takes milliseconds to seconds: done on the event
        # loop it would stall every other request, health checks included. A small pool does it; the semaphore
        # keeps the pool's queue short, so a burst of uploads waits as cheap coroutines, not as queued work.
        self._decoders = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="graft-decode")
        self._decode_slots = asyncio.Semaphore(settings.decode_workers * 2)
        self._drift_testing = False  # one test at a time; rows keep arriving in the monitor's ring buffer
        # Under heavy traffic windows are sampled, not all tested: the tests take serving.drift.cpu_share of a core.
        self._drift_budget = CpuBudget(settings.serving.drift.cpu_share)
        self.capture: CaptureStore | None = None
        if settings.serving.capture.enabled:
            self.capture = CaptureStore(settings.serving.capture)
            self.metrics.registry.register(CaptureCollector(self.capture))
        # The shadow: the model behind serving.shadow.alias, run after answers are sent (deploy/shadow.py).
        self.shadowed: Served | None = None
        self.shadow_metrics: ShadowMetrics | None = None
        self._shadow_queue: ShadowQueue | None = None
        self._shadow_refused: set[str] = set()
        self._shadow_recent: OrderedDict[str, tuple[str, str]] = OrderedDict()  # item id -> (served, shadow) classes
        # The canary: the version behind serving.canary.alias, answering the registry's share of requests.
        self.canary: CanaryRoute[Served] | None = None
        self.canary_source: RegistrySource | None = None
        self._canary_refused: set[str] = set()
        # Versions asked for by number (/v2/models/NAME/versions/V) beside the aliases', least recently asked first.
        self._pinned: OrderedDict[str, Served] = OrderedDict()
        self._pin_lock = asyncio.Lock()
        # Swaps loaded and waiting for their scheduled moment (a Unix time; 0: at once): _switch_at_moment.
        self._pending: list[Callable[[], None]] = []
        self._pending_at = 0.0
        if settings.serving.canary.enabled and isinstance(source, RegistrySource):
            self.canary_source = source.for_alias(settings.serving.canary.alias)
        shadow = settings.serving.shadow
        if shadow.enabled:
            if not isinstance(source, RegistrySource):
                raise SourceError(f"serving.shadow follows a registry alias ({shadow.alias}): serve from a registry "
                                  f"(--tracking-uri), not a file, or turn shadow off")
            self.shadow_source = source.for_alias(shadow.alias)
            self.shadow_metrics = ShadowMetrics(self.metrics.registry)
        # The shadow's runs take at most serving.shadow.cpu_share of a core (1: no cap, every sampled answer queued).
        self._shadow_budget = CpuBudget(shadow.cpu_share) if shadow.enabled and shadow.cpu_share < 1 else None

    # ------------------------------------------------------------ loading and reloading

    async def _start_version(self, source: FileSource | RegistrySource, version: str,
                             on_batch: Callable[[int, float, float], None] | None, threads: int | None = None) -> Served:
        """`version` loaded, warm, with its batcher started (`on_batch`: counts its model calls; `threads`: its
        ONNX Runtime intra-op threads, default serving.threads)."""
        serving = self.settings.serving
        model, tags = await asyncio.to_thread(load_version, source, version, self.settings,
                                              serving.threads if threads is None else threads)
        batcher = DynamicBatcher(model.run_served, serving.max_batch_size, serving.max_queue_delay_ms / 1000, on_batch,
                                 after_run=lambda outputs: served.monitor(outputs))
        served = Served(version, model, batcher, tags)
        batcher.start()
        return served

    async def switch_to(self, version: str) -> None:
        async with self._swap_lock:
            served = await self._start_version(self.source, version, self.metrics.on_batch)
            model, serving, drift = served.model, self.settings.serving, None
            if model.drift_reference is not None:
                # In a worker thread: the monitor computes the reference's own distances (about 10 ms of numpy),
                # which the event loop must not wait for while it answers during a move.
                drift = await asyncio.to_thread(DriftMonitor, model.drift_reference, serving.drift.window,
                                                serving.drift.level, serving.drift.permutations)
                self.metrics.drift_window.set(serving.drift.window)
                self.metrics.drift_level.set(serving.drift.level)
            else:
                log.warning("v%s has no drift reference (exported before drift monitoring): its answers are not "
                            "tested for drift", version)
            served.drift = drift
            old = self.served

            def swap() -> None:
                self.served = served  # the one atomic step
                self.metrics.model_info.clear()
                self.metrics.model_info.labels(self.settings.model_name, version, model.provider, model.variant).set(1)
                log.info("serving %s v%s, variant %s: %s", self.settings.model_name, version, model.variant_note,
                         model.provider_note)

            if old is None:
                swap()  # a first load answers at once; a move at its scheduled moment
            else:
                await self._switch_at_moment(swap)
                await old.batcher.stop()  # finishes what the old version already accepted

    def _refuse(self, version: str, error: IntegrityError) -> None:
        self._refused.add(version)
        self.metrics.refused.labels(self.settings.model_name, version).inc()
        log.error("refused v%s, still serving %s: %s", version,
                  f"v{self.served.version}" if self.served else "nothing", error)

    async def _switch_if_new(self) -> bool:
        """Load the alias's version unless it is served already or was refused; True when it switched."""
        version = await asyncio.to_thread(self.source.current_version)
        if version in self._refused or (self.served is not None and version == self.served.version):
            return False
        try:
            await self.switch_to(version)
        except IntegrityError as error:
            self._refuse(version, error)
            return False
        return True

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.settings.serving.poll_seconds)
            try:
                if await self._switch_if_new():
                    self.metrics.reloads.labels("switched").inc()
            except (SourceError, ModelLoadError, OSError) as error:
                self.metrics.reloads.labels("failed").inc()
                log.error("alias check or reload failed, still serving v%s: %s", self.served and self.served.version, error)
            except Exception as error:  # keep following: one unexpected error must not end reloads for good
                self.metrics.reloads.labels("failed").inc()
                log.exception("unexpected reload error: %s", error)
            await self._follow_side_models()

    async def _follow_side_models(self) -> None:
        """The canary and the shadow after the champion: each errs on its own, never touching serving."""
        if self.canary_source is not None:
            await self._follow_canary_checked()
        if self.shadow_metrics is not None:
            await self._follow_shadow_checked()

    async def _side_version(self, source: RegistrySource, refused: set[str]) -> str | None:
        """The version behind a side model's alias (the canary's, the shadow's); None while the alias does not exist,
        names the served version, or names one whose file failed its hash check."""
        try:
            version = await asyncio.to_thread(source.current_version)
        except RegistryUnreachable:
            raise
        except SourceError:
            return None  # no such alias (yet)
        return None if version in refused or version == self.served.version else version

    async def _follow_canary(self) -> None:
        """Take the registry's canary share and the canary alias's version. No canary while the share is 0, the alias
        does not exist or names the champion, or its file failed its hash check. A share change alone swaps the route
        (keys below the new share move, no version loads); a new version is loaded and warm before it answers. Either
        takes effect at the change's scheduled moment."""
        source = self.canary_source
        share = parse_share(await asyncio.to_thread(source.model_tag, CANARY_SHARE_TAG))
        version = await self._side_version(source, self._canary_refused) if share > 0 else None
        old = self.canary
        if version is None:
            canary = None
        elif old is not None and old.served.version == version:
            canary = old if old.share == share else CanaryRoute(old.served, share)
        else:
            try:
                served = await self._start_version(source, version, self.metrics.on_batch)
            except IntegrityError as error:
                self._canary_refused.add(version)
                log.error("refused v%s as the canary: %s", version, error)
                return
            canary = CanaryRoute(dataclasses.replace(served, route="canary"), share)
        if canary is not old:
            def swap() -> None:
                self.canary = canary  # the one atomic step
                if canary is None:
                    log.info("no canary: %s", f"share {share:g}%" if share == 0 else
                             f"{source.alias} is the champion or does not exist")
                else:
                    log.info("canary %s@%s v%s answers %g%% of requests (by %s), variant %s",
                             self.settings.model_name, source.alias, canary.served.version, share, KEY_HEADER_NOTE,
                             canary.served.model.variant_note)

            await self._switch_at_moment(swap)
        self._show_canary()
        if old is not None and (canary is None or canary.served is not old.served):
            await old.served.batcher.stop()  # finishes what the old canary already accepted

    async def _switch_at_moment(self, swap: Callable[[], None]) -> None:
        """Make `swap` (one atomic change of what answers) at the moment the registry's latest traffic change takes
        effect (TRAFFIC_AT_TAG, written before the change, serving.switch_lead_seconds ahead): every server following
        the registry switches then, together. Until then it waits, pending; the first request routed at or after the
        moment makes it (`route`), so no request sent after the moment meets what answered before it, however busy
        the event loop. A change seen after its moment (a poll or a load slower than the lead) is made at once, said
        in the log and in /metrics; one Graft did not schedule (an alias moved by hand in MLflow) too."""
        at = 0.0
        if isinstance(self.source, RegistrySource):  # a file is served as it is: nothing schedules it
            try:
                at = float(await asyncio.to_thread(self.source.model_tag, TRAFFIC_AT_TAG) or 0)
            except ValueError:
                at = 0.0
        self._pending.append(swap)
        self._pending_at = at
        if at > time.time():  # a clock far ahead waits no longer than this
            await asyncio.sleep(min(at - time.time(), max(60.0, 2 * self.settings.serving.switch_lead_seconds)))
        self._make_pending()

    def _make_pending(self) -> None:
        """The pending swaps, made now: their moment has come."""
        swaps, self._pending = self._pending, []
        for swap in swaps:
            swap()
        if not swaps:
            return  # made already, by the first request routed at the moment
        lead, late = self.settings.serving.switch_lead_seconds, time.time() - self._pending_at
        if not self._pending_at or late > 10 * lead:
            self.metrics.switch_late.set(0)
            log.info("switched on sight: the registry's latest traffic change was not scheduled by graft")
            return
        self.metrics.switch_late.set(max(0.0, late))
        if late > SWITCH_ON_TIME_SECONDS:
            log.warning("switched %.2f s after the change's scheduled moment: this server polls every %g s and loads "
                        "a version in its own time; raise serving.switch_lead_seconds (%g) or lower poll_seconds",
                        late, self.settings.serving.poll_seconds, lead)

    def _show_canary(self) -> None:
        canary = self.canary
        self.metrics.canary_share.set(canary.share if canary else 0)
        self.metrics.canary_info.clear()
        self.metrics.canary_info.labels(self.settings.serving.canary.alias,
                                        canary.served.version if canary else "none").set(1)

    async def _follow_canary_checked(self) -> None:
        try:
            await self._follow_canary()
        except Exception as error:  # the canary as it was answers on: said, and tried again at the next poll
            log.warning("canary check or load failed, canary still %s: %s",
                        f"v{self.canary.served.version} at {self.canary.share:g}%" if self.canary else "none", error)

    def route(self, key: str) -> Served:
        """The version that answers a request with this key: the canary for its share of keys, else the champion."""
        if self._pending and time.time() >= self._pending_at:
            self._make_pending()
        canary = self.canary
        return canary.served if canary is not None and canary.takes(key) else self.served

    async def _follow_shadow(self) -> None:
        """Load the shadow alias's version when it moved. Nothing is shadowed while the alias does not exist or names
        the served version (nothing to compare), nor a version whose file failed its hash check."""
        version = await self._side_version(self.shadow_source, self._shadow_refused)
        if version == (self.shadowed.version if self.shadowed else None):
            return
        shadowed = None
        if version is not None:
            try:
                shadowed = await self._start_version(self.shadow_source, version, None,
                                                     self.settings.serving.shadow.threads)
            except IntegrityError as error:
                self._shadow_refused.add(version)
                log.error("refused to shadow v%s: %s", version, error)
        old, self.shadowed = self.shadowed, shadowed  # the next shadowed request runs on it
        alias = self.settings.serving.shadow.alias
        self.shadow_metrics.model_info.clear()
        self.shadow_metrics.model_info.labels(alias, shadowed.version if shadowed else "none").set(1)
        if shadowed is not None:
            log.info("shadowing %s@%s v%s beside the served v%s, variant %s", self.settings.model_name, alias,
                     shadowed.version, self.served.version, shadowed.model.variant_note)
        else:
            log.info("nothing to shadow: %s@%s %s", self.settings.model_name, alias,
                     "does not exist" if version is None and old is None else "is not another version")
        if old is not None:
            await old.batcher.stop()

    async def _follow_shadow_checked(self) -> None:
        try:
            await self._follow_shadow()
        except Exception as error:  # the shadow never touches serving: said, and tried again at the next poll
            log.warning("shadow alias check or load failed, still shadowing %s: %s",
                        f"v{self.shadowed.version}" if self.shadowed else "nothing", error)

    async def load_current(self) -> None:
        self.ready = await self._switch_if_new() or self.served is not None

    async def _run(self) -> None:
        """Live at once, ready once a version is loaded and warm (waiting for the alias if it does not exist
        yet), then follow the alias."""
        while not self.ready:
            try:
                await self.load_current()
            except Exception as error:  # whatever it was, stay live and try again: readiness tells the rest
                log.warning("not ready: %s; retrying in %.1fs", error, self.settings.serving.poll_seconds)
            if not self.ready:
                await asyncio.sleep(self.settings.serving.poll_seconds)
        await self._follow_side_models()
        if isinstance(self.source, RegistrySource):
            await self._follow_alias()

    def start(self) -> None:
        shadow = self.settings.serving.shadow
        if self.shadow_metrics is not None:  # as many workers as one shadow batch takes: they share model calls
            self._shadow_queue = ShadowQueue(shadow.queue, min(shadow.queue, self.settings.serving.max_batch_size),
                                             self._run_shadow, self._shadow_done, self._shadow_dropped)
        self._reloader = asyncio.get_running_loop().create_task(self._run())

    async def card_of(self, served: Served) -> ModelCard | None:
        """The version's model card, fetched from the registry when first asked for (the page), never on the
        loading path: serving does not wait for it."""
        if not served.card_fetched:
            served.card = await asyncio.to_thread(self.source.card, served.version)
            served.card_fetched = True
        return served.card

    async def stop(self) -> None:
        if self._reloader:
            self._reloader.cancel()
        if self._shadow_queue is not None:
            await self._shadow_queue.stop()
        for served in (self.served, self.shadowed, self.canary and self.canary.served, *self._pinned.values()):
            if served is not None:
                await served.batcher.stop()
        self._decoders.shutdown(wait=False, cancel_futures=True)
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)

    # ------------------------------------------------------------ versions asked for by number

    def loaded_versions(self, first: str | None = None) -> list[str]:
        """The versions loaded here: `first` (the one a metadata request is about), the alias's, the canary's, the
        shadow's, then those pinned by requests."""
        side = (self.canary and self.canary.served, self.shadowed)
        versions = [served.version for served in (self.served, *side) if served is not None]
        return list(dict.fromkeys([*([first] if first else []), *versions, *self._pinned]))

    def loaded(self, version: str) -> Served | None:
        for served in (self.served, self.canary and self.canary.served, self.shadowed, self._pinned.get(version)):
            if served is not None and served.version == version:
                return served
        return None

    def configuration(self, name: str, served: Served) -> dict:
        """Triton's model configuration of `served` as model `name` (deploy/v2.py model_config): both transports'."""
        serving = self.settings.serving
        return model_config(name, served.version, served.model, serving.max_batch_size, serving.max_queue_delay_ms)

    async def servable(self, name: str, version: str | None) -> Served:
        """The version of model `name` a request is for (None: the alias's), loaded if it must be; NotServable says
        why there is none. Both transports ask here."""
        if name != self.settings.model_name:
            raise NotServable(404, f"unknown model {name!r}; this server serves {self.settings.model_name!r}")
        if not self.ready:
            raise NotServable(503, "the model is not loaded yet")
        return self.served if version is None else await self.version(version)

    async def version(self, version: str) -> Served:
        """Version `version` by number: one of the loaded ones, or a registered version loaded now and kept while it is
        among the serving.pinned_versions most recently asked for. NotServable says why there is none to serve."""
        if (served := self.loaded(version)) is not None:
            if version in self._pinned:
                self._pinned.move_to_end(version)
            return served
        limit = self.settings.serving.pinned_versions
        if not isinstance(self.source, RegistrySource):
            raise NotServable(404, f"version {version!r} is not served: this server serves one file, as version "
                                 f"{self.served.version if self.served else 'file'}")
        if version in self._refused:
            raise NotServable(404, f"v{version} is not served: its file failed its hash check (see the server's log)")
        if limit == 0:
            raise NotServable(404, f"v{version} is not served: only the aliases' versions ({', '.join(self.loaded_versions())})"
                                 f" are, as serving.pinned_versions is 0")
        async with self._pin_lock:  # loads are rare and heavy: one at a time, and never the same version twice
            if (served := self.loaded(version)) is not None:
                return served
            try:
                served = await self._start_version(self.source, version, self.metrics.on_batch)
            except IntegrityError as error:
                self._refuse(version, error)
                raise NotServable(404, f"v{version} is not served: its file failed its hash check: {error}") from None
            except RegistryUnreachable as error:
                raise NotServable(503, f"v{version} cannot be loaded now: {error}") from None
            except SourceError as error:  # no such version, or no file for the variant to serve
                raise NotServable(404, f"v{version} is not served: {error}") from None
            except ModelLoadError as error:
                raise NotServable(503, f"v{version} cannot be loaded: {error}") from None
            served.route = "pinned"
            self._pinned[version] = served
            log.info("loaded v%s, asked for by number (%d of serving.pinned_versions %d)", version,
                     len(self._pinned), limit)
            while len(self._pinned) > limit:
                _, least_recent = self._pinned.popitem(last=False)
                await least_recent.batcher.stop()  # finishes what it accepted; later requests load it again
            return served

    # ------------------------------------------------------------ answering

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run CPU-bound request work (parsing, decoding) in the decode pool."""
        async with self._decode_slots:
            return await asyncio.get_running_loop().run_in_executor(self._decoders, work)

    async def infer(self, prepare: Callable[[Served], np.ndarray], key: str, inline: bool = False,
                    version: str | None = None) -> Inferred:
        """Prepare the request for the version that answers its `key` now (the champion, or the canary for its share;
        `version`: that one, by number) off the event loop unless `inline` (small work), and run it there; if that
        version is swapped out before the request is queued, route and prepare it again. Never two versions in one
        answer."""
        async def prepared(served: Served) -> np.ndarray:
            return prepare(served) if inline else await self.off_loop(lambda: prepare(served))

        while True:
            served = self.route(key) if version is None else await self.version(version)
            try:
                rows = await prepared(served)
            except InputError:
                if served.route != "canary":
                    raise
                served = self.served  # a canary with another input (its own contract): the champion answers
                rows = await prepared(served)
            self.metrics.queue_depth.set(served.batcher.depth)
            started = time.perf_counter()
            try:
                outputs = await served.batcher.submit(rows)
            except BatcherClosed:
                continue
            return Inferred(rows, *served.model.split(outputs), served, time.perf_counter() - started)

    async def _test_drift(self, served: Served) -> None:
        """Test the served version's latest window in a worker thread (tens of milliseconds of numpy)."""
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(served.drift.test)
        except Exception as error:  # the answers were given; a failed test must not end drift monitoring for good
            log.exception("drift test failed: %s", error)
            return
        finally:
            self._drift_testing = False
            self._drift_budget.spent(started, time.monotonic() - started)
        self.metrics.on_drift_test(result)
        if result.drifted:
            log.warning("drift: the last %d answers of v%s differ from its reference (MMD p = %.4f < %g; predicted "
                        "classes %.2f from the reference's mix, mean confidence %.3f vs %.3f)", result.window,
                        served.version, result.p_value, result.level, result.class_tv_reference,
                        result.mean_confidence, result.reference_mean_confidence)

    def answered(self, endpoint: str, request_id: str, inferred: Inferred, inputs: bytes | np.ndarray,
                 probabilities: np.ndarray | None = None) -> BackgroundTask | None:
        """An answer given: counted by its version; with capture on, a sampled answer goes to the capture store
        (queued: the writer thread does the rest); with shadow on, a sampled answer of the champion is offered to the
        shadow once it is sent. `inputs`: the uploaded file's bytes, or the request's float32 rows; `probabilities`:
        the logits' softmax when the endpoint already computed it for its answer."""
        served, logits, features = inferred.served, inferred.logits, inferred.features
        if (answers := self._answers.get((served.version, served.route))) is None:
            answers = self._answers[served.version, served.route] = self.metrics.answers.labels(served.version, served.route)
        answers.inc()
        if (served.drift is not None and served.drift.full() and not self._drift_testing
                and self._drift_budget.take()):  # the rows went to the monitor with their batch (Served.monitor)
            self._drift_testing = True
            asyncio.get_running_loop().create_task(self._test_drift(served))
        if self.capture is not None and self.capture.sampled():
            if probabilities is None:
                probabilities = softmax(logits)
            self.capture.submit(Answer(request_id, endpoint, self.settings.model_name, served.version,
                                       served.model.variant, served.model.classes, probabilities, inputs, features,
                                       served.model.contract))
        background = None
        if (self.shadowed is not None and self._shadow_queue is not None and served.route == "champion"
                and random.random() < self.settings.serving.shadow.fraction):
            if self._shadow_budget is None or self._shadow_budget.take():
                job = ShadowJob(request_id, inputs, served.version, predicted_classes(logits, served.model.classes),
                                inferred.seconds, time.time())
                background = BackgroundTask(self._offer_shadow, job)  # runs once the response is sent
            else:
                self._shadow_dropped(OVER_BUDGET)
        return background  # the shadow's turn, once the response is sent

    # ------------------------------------------------------------ the shadow

    async def _offer_shadow(self, job: ShadowJob) -> None:
        self._shadow_queue.offer(job)

    async def _run_shadow(self, job: ShadowJob) -> ShadowOutcome | None:
        """The shadow's answer to a request, its time charged to the shadow's CPU budget whatever the outcome."""
        started = time.monotonic()
        try:
            return await self._shadow_answer(job)
        finally:
            if self._shadow_budget is not None:
                self._shadow_budget.spent(started, time.monotonic() - started)

    async def _shadow_answer(self, job: ShadowJob) -> ShadowOutcome | None:
        """From the input the served model had: an upload decoded for the shadow's own contract, or the same rows
        (refused when the shadow takes another shape). None: nothing to shadow now."""
        shadow = self.shadowed
        if shadow is None:
            return None
        contract = shadow.model.contract
        if isinstance(job.inputs, bytes):
            rows = await self.off_loop(lambda: image_row(job.inputs, contract))
        elif job.inputs.shape[1:] != tuple(contract.shape):
            raise InputError(f"the shadow v{shadow.version} takes rows of shape {list(contract.shape)}, the served "
                             f"model {list(job.inputs.shape[1:])}: tensor requests cannot be shadowed")
        else:
            rows = job.inputs
        started = time.perf_counter()
        logits, _ = shadow.model.split(await shadow.batcher.submit(rows))
        return ShadowOutcome(job, self.settings.serving.shadow.alias, shadow.version,
                             predicted_classes(logits, shadow.model.classes), time.perf_counter() - started)

    def _shadow_done(self, outcome: ShadowOutcome) -> None:
        counted = self.shadow_metrics
        counted.outcomes["compared"].inc()
        counted.rows.inc(len(outcome.predicted))
        counted.agreements.inc(outcome.agreements)
        counted.latency.labels("served").observe(outcome.job.seconds)
        counted.latency.labels("shadow").observe(outcome.seconds)
        rows = len(outcome.predicted)
        for row, (served, shadow) in enumerate(zip(outcome.job.predicted, outcome.predicted)):
            self._shadow_recent[item_id(outcome.job.request_id, row, rows)] = (served, shadow)
        while len(self._shadow_recent) > SHADOW_RECENT_ITEMS:
            self._shadow_recent.popitem(last=False)
        if self.capture is not None:
            self.capture.submit_shadow(outcome.job.time, outcome.records())

    def _shadow_dropped(self, reason: str) -> None:
        self.shadow_metrics.outcomes[reason].inc()

    def labelled(self, item: str, label: str) -> None:
        """A feedback label arrived: when its item was shadowed lately, count which of the two models was right."""
        if self.shadow_metrics is not None and (pair := self._shadow_recent.get(item)) is not None:
            served, shadow = ("right" if predicted == label else "wrong" for predicted in pair)
            self.shadow_metrics.labelled.labels(served, shadow).inc()


async def _multipart_file(headers, body: bytes) -> bytes:
    """The field named "file" of a multipart body already read (and so already held to the body limit)."""
    async def once():
        yield body

    try:
        form = await MultiPartParser(headers, once(), max_files=1, max_fields=8).parse()
    except MultiPartException as error:
        raise InputError(f"malformed multipart upload: {error.message}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InputError('multipart upload needs a file field named "file"')
    return await upload.read()


def image_row(blob: bytes, contract: Contract) -> np.ndarray:
    """An uploaded image file -> the one-row float32 tensor a model of `contract` takes."""
    return contract.normalize(decode_image(blob, contract)[None])


def _authorised(headers: dict[bytes, bytes], token: str) -> bool:
    return bearer_matches(headers.get(b"authorization", b"").decode("latin-1"), token)


class BindRefused(ValueError):
    """The server may not or cannot listen where it was asked: beyond loopback with no token and no explicit
    --insecure-no-auth, or on an address it cannot bind (a port in use)."""


def check_bind(host: str, token: str, insecure: bool) -> None:
    """Listening beyond this machine without a token is refused unless the operator says, in so many words,
    that it is meant."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token and not insecure:
        raise BindRefused(f"refusing to listen on {host} without an API token: set {TOKEN_VARIABLE} (clients then send "
                          f"'Authorization: Bearer <token>'), bind 127.0.0.1, or pass --insecure-no-auth")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


BINARY_HEADER = "inference-header-content-length"  # Triton's binary tensor extension
INLINE_BODY_BYTES = 65536  # smaller bodies are parsed on the event loop: a thread hop costs more than the parse
INLINE_IMAGE_PIXELS = 256 * 256  # images up to this size are decoded on the event loop (well under a millisecond)
REQUEST_ID_HEADER = "X-Request-Id"  # every answered inference request's id: what POST /feedback names
VERSION_HEADER = "X-Model-Version"  # the version that answered (the champion's, or the canary's)
# The same names as ASGI carries them (lower-case bytes), for the endpoint that reads and writes raw ASGI headers.
RAW_BINARY_HEADER, RAW_REQUEST_ID_HEADER, RAW_VERSION_HEADER = (
    name.lower().encode("latin-1") for name in (BINARY_HEADER, REQUEST_ID_HEADER, VERSION_HEADER))


def request_identity(key_header_value: str | None) -> tuple[str, str]:
    """A new request id, and the key that routes the request: the value of its serving.canary.key_header, else the id."""
    request_id = new_request_id()
    return request_id, key_header_value or request_id


# An error answered before the body is read (a 413 from the declared length, a 401, a chunked body past the limit)
# leaves the client still sending. Closing then makes the kernel reset the connection, and a client that sends its
# whole body before reading (urllib, requests) gets "connection reset" instead of the answer. So the answer is sent,
# the rest of the body read and thrown away, and only then the connection closed; bounded, so that a client
# claiming gigabytes cannot hold the server: past these the connection is closed (and reset) at once.
DRAIN_BYTES = 128 * 2**20  # or 4x max_body_bytes when that is more: a 64 MB upload to a 10 MB limit is drained
DRAIN_SECONDS = 5.0


INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
PLAIN_ENDPOINTS = frozenset({"/", "/predict", "/feedback", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready",
                             f"/{CARD_MISTAKES}"})


def endpoint_label(path: str) -> str:
    """A request path as its endpoint, for metrics: model names and version numbers left out, and any other path
    "other", so that the series stay few whatever clients send (/v2/models/NAME/versions/3/infer ->
    /v2/models/infer; /v2/models/NAME -> /v2/models/metadata)."""
    if not path.startswith("/v2/models/"):
        return path if path in PLAIN_ENDPOINTS else "other"
    rest = path.split("/")[4:]
    if rest[:1] == ["versions"]:
        rest = rest[2:]
    return "/v2/models/" + (rest[-1] if rest else "metadata")


class Guard:
    """Every request: the API token, the body limit, latency and counts. Plain ASGI, and the outermost application
    (around FastAPI's, `app`): Starlette's BaseHTTPMiddleware costs a task and a stream per request, a large part of
    a small request's time, and FastAPI's own layers (its telemetry check, Starlette's error middleware) a few more
    microseconds that the busiest endpoint skips."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.limit = settings.serving.max_body_bytes
        self.drain_bytes = max(DRAIN_BYTES, 4 * self.limit)
        self._latency: dict[str, Histogram] = {}  # endpoint -> its latency series
        self._requests: dict[tuple[str, int], Counter] = {}  # (endpoint, status) -> its request count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = endpoint_label(path)
        started = time.perf_counter()
        status = 500
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        body_unread = (length is not None and length != b"0") or b"transfer-encoding" in headers
        # A client that waits for "100 Continue" sends no body after an early answer: nothing to drain.
        drain = (headers.get(b"expect", b"").lower() != b"100-continue"
                 and (length is None or not length.isdigit() or int(length) <= self.drain_bytes))
        held = False  # the answer's end, held back while the body is drained

        async def receive_noting_end():
            nonlocal body_unread
            message = await receive()
            body_unread = body_unread and message.get("more_body", False)  # also False on http.disconnect
            return message

        async def send_noting_status(message) -> None:
            nonlocal status, held
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400 and body_unread:  # close after it: no keep-alive client has the server read on and on
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif status >= 400 and body_unread and drain and not message.get("more_body", False):
                message, held = {**message, "more_body": True}, True
            await send(message)

        refusal = None
        if self.settings.token and not path.startswith("/v2/health/") and not _authorised(headers, self.settings.token):
            refusal = _error(401, "this server needs an API token: send the header 'Authorization: Bearer <token>'")
            refusal.headers["WWW-Authenticate"] = "Bearer"
            self.metrics.errors.labels(endpoint, "unauthorised").inc()
        elif length is not None and (not length.isdigit() or int(length) > self.limit):
            refusal = _error(413, f"body of {length.decode('latin-1')} bytes is over the limit of {self.limit}")
            self.metrics.errors.labels(endpoint, "too_large").inc()
        if refusal is None and (match := INFER_PATH.fullmatch(path)) and scope["method"] == "POST":
            # The busiest endpoint skips FastAPI's and Starlette's layers, the routing (a regular expression per
            # route tried) and the endpoint wrapper: 15-19 us less of the server's CPU per request at c=32
            # (benchmarks/README.md "The server's own CPU per request"). An error is answered 500 by uvicorn.
            await infer(scope, receive_noting_end, send_noting_status, self.app.state.server, headers,
                        match["name"], match["version"])
        else:
            await (refusal or self.app)(scope, receive_noting_end, send_noting_status)
        seconds = time.perf_counter() - started
        if (latency := self._latency.get(endpoint)) is None:  # a labelled child looked up once: every request pays this
            latency = self._latency[endpoint] = self.metrics.latency.labels(endpoint)
        latency.observe(seconds)
        if (counted := self._requests.get((endpoint, status))) is None:
            counted = self._requests[endpoint, status] = self.metrics.requests.labels(endpoint, str(status))
        counted.inc()
        if held:
            await self._drain(receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})  # the server closes now

    async def _drain(self, receive) -> None:
        """Read and drop the rest of the body, bounded in bytes and time. Memory stays small: uvicorn stops reading
        the socket past 64 kB not yet received here."""
        drained = 0
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while drained <= self.drain_bytes:
                    message = await receive()
                    drained += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            pass


# ------------------------------------------------------------ the application: each piece named, create_app wires them


def _server(request: Request) -> ModelServer:
    return request.app.state.server


@asynccontextmanager
async def lifespan(app: FastAPI):
    server: ModelServer = app.state.server
    if server.settings.serving.strict:
        # Strict serving loads before it listens: a CPU fallback (ProviderError) stops the start.
        await server.load_current()
    server.start()
    serving = server.settings.serving
    endpoint = None
    if serving.grpc_port:
        endpoint = await v2_grpc.start(server, serving.host, serving.grpc_port, server.settings.token,
                                       serving.max_body_bytes)
    yield
    if endpoint is not None:
        await v2_grpc.stop(endpoint)
    await server.stop()


async def read_body(receive, limit: int) -> bytes:
    """The whole body from an ASGI `receive`, refused past `limit` bytes as it comes: chunked bodies carry no
    content-length. A client gone before its end raises ClientDisconnect, as Starlette's request.stream() does."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def asked_version(request: Request) -> Served:
    """The version a /v2/models/NAME[/versions/V]/... request is for."""
    return await _server(request).servable(request.path_params["name"], request.path_params.get("version"))


async def server_metadata(request: Request):
    """GET /v2: the server's name, version and the protocol extensions it supports."""
    return JSONResponse(v2_server_metadata())


async def live(request: Request):
    return JSONResponse({"live": True})


async def ready(request: Request):
    server = _server(request)
    return JSONResponse({"ready": server.ready}, status_code=200 if server.ready else 503)


async def model_ready(request: Request):
    """GET /v2/models/NAME[/versions/V]/ready: 200 when the version can answer now (asked by number: once loaded)."""
    name = request.path_params["name"]
    try:
        served = await asked_version(request)
    except NotServable as error:
        return JSONResponse({"name": name, "ready": False, "error": error.message}, status_code=error.status)
    return JSONResponse({"name": name, "version": served.version, "ready": True})


async def model_metadata(request: Request):
    """GET /v2/models/NAME[/versions/V]: the V2 metadata, and Graft's facts of the version in parameters."""
    try:
        served = await asked_version(request)
    except NotServable as error:
        return _error(error.status, error.message)
    server, name = _server(request), request.path_params["name"]
    serving, canary = server.settings.serving, server.canary
    return JSONResponse({
        **v2_model_metadata(name, served.model, server.loaded_versions(first=served.version)),
        "parameters": {
            "version": served.version, "provider": served.model.provider,
            "variant": served.model.variant, "variant_note": served.model.variant_note,
            "requested_providers": list(served.model.requested_providers),
            "active_providers": list(served.model.active_providers), "provider_note": served.model.provider_note,
            "classes": list(served.model.classes),
            "preprocess": served.model.contract.to_dict(),
            "max_batch_size": serving.max_batch_size, "max_queue_delay_ms": serving.max_queue_delay_ms,
            "max_body_bytes": serving.max_body_bytes,
            "max_infer_rows": max_infer_rows(served.model, serving.max_body_bytes),
            # the version answering a share of requests (its own inputs, when its contract differs, are not these)
            "canary": {"alias": serving.canary.alias, "version": canary.served.version, "share_percent": canary.share}
            if canary else None,
        },
    })


async def model_configuration(request: Request):
    """GET /v2/models/NAME[/versions/V]/config: Triton's model configuration of the version."""
    try:
        served = await asked_version(request)
    except NotServable as error:
        return _error(error.status, error.message)
    return JSONResponse(_server(request).configuration(request.path_params["name"], served))


def unsupported_endpoint(extension: str):
    async def answer(request: Request):
        return _error(501, unsupported(extension))
    return answer


async def infer(scope, receive, send, server: ModelServer, headers: dict[bytes, bytes], name: str,
                version: str | None) -> None:
    """POST /v2/models/NAME[/versions/V]/infer, plain ASGI, called by the Guard with the request's headers: the
    busiest endpoint builds no Starlette request or response (benchmarks/README.md "The server's own CPU per
    request"). An error is answered as JSON, as by every endpoint."""
    answer = await _infer_answer(server, receive, headers, name, version)
    if isinstance(answer, Response):
        await answer(scope, receive, send)
        return
    body, answer_headers, shadow_turn = answer
    await send({"type": "http.response.start", "status": 200, "headers": answer_headers})
    await send({"type": "http.response.body", "body": body})
    if shadow_turn is not None:  # after the answer, as a response's background task
        await shadow_turn()


async def _infer_answer(server: ModelServer, receive, headers: dict[bytes, bytes], name: str, version: str | None
                        ) -> Response | tuple[bytes, list[tuple[bytes, bytes]], BackgroundTask | None]:
    """An infer request -> (the answer's body, its headers, the shadow's turn), or the error Response."""
    metrics, limit = server.metrics, server.settings.serving.max_body_bytes
    try:
        await server.servable(name, version)  # before the body is read: an unknown model or version is said at once
    except NotServable as error:
        metrics.errors.labels("infer", "model").inc()
        return _error(error.status, error.message)
    raw = b""
    routing = headers.get(server.settings.serving.canary.key_header.lower().encode("latin-1"))
    request_id, key = request_identity(routing.decode("latin-1") if routing else None)
    try:
        raw = await read_body(receive, limit)
        binary_header = headers.get(RAW_BINARY_HEADER)
        header, binary = split_binary(raw, binary_header.decode("latin-1") if binary_header is not None else None)
        # Small bodies and binary tensors (a JSON header, then bytes numpy takes as they are) are parsed on the
        # event loop: a hop to the decode pool costs more. Large JSON tensors are parsed in the pool.
        inline = binary is not None or len(raw) <= INLINE_BODY_BYTES
        body = orjson.loads(header) if inline else await server.off_loop(lambda: orjson.loads(header))
        inferred = await server.infer(lambda served: parse_json_infer(
            body, served.model, max_infer_rows(served.model, limit), binary), key, inline=inline, version=version)
    except NotServable as error:
        metrics.errors.labels("infer", "model").inc()
        return _error(error.status, error.message)
    except orjson.JSONDecodeError as error:
        metrics.errors.labels("infer", "bad_json").inc()
        if any(token in raw for token in (b"NaN", b"Infinity")):
            return _error(400, "data holds NaN or infinity; send finite numbers")
        return _error(400, f"body is not valid JSON: {error}")
    except InputError as error:
        metrics.errors.labels("infer", "bad_input").inc()
        return _error(413 if isinstance(error, PayloadTooLarge) else 400, str(error))
    served, logits = inferred.served, inferred.logits
    shadow_turn = server.answered("infer", request_id, inferred, inferred.rows)
    output = {"name": served.model.contract.output_name, "datatype": "FP32", "shape": list(logits.shape)}
    payload = {"model_name": name, "model_version": served.version, "id": body.get("id", ""), "outputs": [output]}
    answer_headers = [(RAW_REQUEST_ID_HEADER, request_id.encode("latin-1")),
                      (RAW_VERSION_HEADER, served.version.encode("latin-1"))]
    if wants_binary_output(body):
        data = np.ascontiguousarray(logits, dtype="<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(data)}
        header = orjson.dumps(payload)
        content = header + data
        answer_headers += [(b"content-type", b"application/octet-stream"),
                           (RAW_BINARY_HEADER, str(len(header)).encode("latin-1"))]
    else:  # orjson writes the numpy array directly; FastAPI's default encoder walks every float in Python.
        output["data"] = logits.ravel()
        content = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        answer_headers.append((b"content-type", b"application/json"))
    answer_headers.append((b"content-length", str(len(content)).encode("latin-1")))
    return content, answer_headers, shadow_turn


async def predict(request: Request) -> Response:
    """POST /predict: an image file (raw bytes or a multipart upload) -> the top_k classes. Plain Starlette too."""
    server = _server(request)
    try:
        await server.servable(server.settings.model_name, None)
    except NotServable as error:
        return _error(error.status, error.message)
    top_k = request.query_params.get("top_k", "3")
    if not top_k.lstrip("-").isdigit():
        return _error(422, f"top_k={top_k!r} must be an integer (the number of classes to return)")
    request_id, key = request_identity(request.headers.get(server.settings.serving.canary.key_header))
    try:
        # Bounded, whatever the framing: multipart is parsed from these bytes.
        blob = await read_body(request.receive, server.settings.serving.max_body_bytes)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            blob = await _multipart_file(request.headers, blob)

        def prepare(served: Served) -> np.ndarray:
            return image_row(blob, served.model.contract)

        # A small image decodes faster than a hop to the decode pool; a large one would stall the event loop.
        inferred = await server.infer(prepare, key, inline=declared_pixels(blob) <= INLINE_IMAGE_PIXELS)
    except InputError as error:
        server.metrics.errors.labels("predict", "bad_image").inc()
        return _error(413 if isinstance(error, PayloadTooLarge) else 400, str(error))
    served, probabilities = inferred.served, softmax(inferred.logits)
    order = np.argsort(-probabilities[0])[: max(1, min(int(top_k), probabilities.shape[1]))]
    shadow_turn = server.answered("predict", request_id, inferred, blob, probabilities)
    return Response(orjson.dumps({
        "model_version": served.version,
        "predictions": [{"class": served.model.classes[i], "probability": float(probabilities[0, i])} for i in order],
    }), media_type="application/json", headers={REQUEST_ID_HEADER: request_id, VERSION_HEADER: served.version},
        background=shadow_turn)


# What each refusal of the capture store is answered with, and counted as (graft_feedback_total{outcome}).
FEEDBACK_REFUSALS: dict[type[CaptureError], tuple[int, str]] = {
    InvalidItemId: (400, "bad_request"), UnknownItem: (404, "unknown_id"), UnknownClass: (422, "unknown_class"),
    DuplicateLabel: (409, "duplicate"),
}
FEEDBACK_BODY_BYTES = 4096
FEEDBACK_FORM = 'send JSON {"request_id": "<an answer\'s X-Request-Id>", "label": "<its true class>"}'


async def feedback(request: Request) -> Response:
    """POST /feedback {"request_id": ID, "label": CLASS}: the true class of a captured answer, stored beside it once."""
    server = _server(request)
    counted = server.metrics.feedback
    if server.capture is None:
        counted.labels("capture_off").inc()
        return _error(409, "capture is off on this server, so there is nothing to label: turn on serving.capture "
                           "(params.yaml serving.capture.enabled: true, --capture-enabled or GRAFT_CAPTURE_ENABLED=1)")
    try:
        body = orjson.loads(await read_body(request.receive, FEEDBACK_BODY_BYTES))
    except PayloadTooLarge as error:
        counted.labels("bad_request").inc()
        return _error(413, f"{error}; {FEEDBACK_FORM}")
    except orjson.JSONDecodeError as error:
        counted.labels("bad_request").inc()
        return _error(400, f"body is not valid JSON ({error}); {FEEDBACK_FORM}")
    if not (isinstance(body, dict) and isinstance(body.get("request_id"), str) and isinstance(body.get("label"), str)):
        counted.labels("bad_request").inc()
        return _error(400, f"expected a request_id and a label, both strings; {FEEDBACK_FORM}")
    try:
        await asyncio.to_thread(server.capture.label, body["request_id"], body["label"])
        server.labelled(body["request_id"], body["label"])
    except CaptureError as error:
        status, outcome = FEEDBACK_REFUSALS[type(error)]
        counted.labels(outcome).inc()
        return _error(status, str(error))
    except OSError as error:  # a full disk: the label is not stored, and the client may send it again later
        counted.labels("not_stored").inc()
        return _error(507, f"the label could not be stored: {error}")
    counted.labels("stored").inc()
    return JSONResponse({"request_id": body["request_id"], "label": body["label"]}, status_code=201)


async def prometheus(request: Request):
    server = _server(request)
    if server.served:
        server.metrics.queue_depth.set(server.served.batcher.depth)
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def page(request: Request):
    server = _server(request)
    served = server.served
    card = await server.card_of(served) if served else None
    return render_page(server.settings.model_name, served.version if served else None,
                       served.model.provider if served else None, served.tags if served else {},
                       list(served.model.classes) if served else [],
                       (server.canary.served.version, server.canary.share) if server.canary else None,
                       served.model.variant_note if served else "", card.text if card else None,
                       mistakes_image=bool(card and card.mistakes_png))


async def card_mistakes(request: Request):
    """The served version's most confident test mistakes with their Grad-CAM maps (the card's image)."""
    server = _server(request)
    card = await server.card_of(server.served) if server.served else None
    if card is None or card.mistakes_png is None:
        return _error(404, "the served version has no mistakes gallery (no model card, or registered before Graft "
                           "stored one)")
    return Response(card.mistakes_png, media_type="image/png")


def create_app(source: FileSource | RegistrySource, settings: ServerSettings) -> Guard:
    """The server's ASGI application: the Guard, around the FastAPI application with every route."""
    server = ModelServer(source, settings)
    app = FastAPI(title="Graft model server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    # Routes are tried in order: the busiest first (each miss is a regular expression run on every request).
    app.add_route("/v2/models/{name}/infer", infer, methods=["POST"])
    app.add_route("/predict", predict, methods=["POST"])
    app.add_route("/v2", server_metadata, methods=["GET"])
    app.add_route("/v2/health/live", live, methods=["GET"])
    app.add_route("/v2/health/ready", ready, methods=["GET"])
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):  # the alias's version, or one by number
        app.add_route(model, model_metadata, methods=["GET"])
        app.add_route(f"{model}/ready", model_ready, methods=["GET"])
        app.add_route(f"{model}/config", model_configuration, methods=["GET"])
    app.add_route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])
    for extension, (paths, _) in UNSUPPORTED_EXTENSIONS.items():
        for path in paths:
            app.add_route(path, unsupported_endpoint(extension), methods=["GET", "POST"])
    app.add_route("/feedback", feedback, methods=["POST"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route(f"/{CARD_MISTAKES}", card_mistakes, methods=["GET"])
    return Guard(app, settings, server.metrics)


def build_source(tracking_uri: str | None, model_name: str, alias: str, onnx_file: str | None, cache_dir: str):
    if onnx_file:
        return FileSource(onnx_file)
    if not tracking_uri:
        raise SystemExit("give --tracking-uri (with --model and --alias) or --onnx-file")
    return RegistrySource(tracking_uri, model_name, alias, cache_dir)


def bind(host: str, port: int, option: str = "--port N") -> socket.socket:
    """The listening socket, bound here before any model is loaded, as uvicorn binds one for its workers. Left to
    uvicorn, a port in use gave its log lines and exit status 3 (graft's status for a rejected candidate)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise BindRefused(f"port {port} on {host} is already in use (another server?); stop it or pass {option}") from None
        raise BindRefused(f"cannot listen on {host} port {port}: {error.strerror or error}; pass --host or {option}") from None
    return sock


def serve(source, settings: ServerSettings, log_level: str = "info", insecure: bool = False) -> None:
    """Listen on settings.serving's host and port and serve until stopped."""
    import uvicorn

    host, port = settings.serving.host, settings.serving.port
    check_bind(host, settings.token, insecure)
    if settings.serving.grpc_port:  # said now, in a line, not as a failed start once models are loaded
        bind(host, settings.serving.grpc_port, "--grpc-port N (0: no gRPC)").close()
    sock = bind(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line for every registry poll would bury the server's own
    server = uvicorn.Server(uvicorn.Config(create_app(source, settings), host=host, port=port, log_level=log_level,
                                           access_log=False))
    log.info("bound %s port %d: listening once the application has started", host, port)
    try:
        server.run(sockets=[sock])  # uvicorn serves the socket bound above: no second bind that could fail
    except KeyboardInterrupt:  # uvicorn has shut down on Ctrl+C and raised it again, as uvicorn.run ignores it
        pass


def argument_parser() -> argparse.ArgumentParser:
    """`python -m deploy.server`'s options: one per serving setting (deploy/settings.py: the option, its help and its
    environment variable derived from the field), and where and what to serve."""
    parser = argparse.ArgumentParser(prog="python -m deploy.server",
                                     description="Graft model server (ONNX Runtime). Every option also reads an "
                                     "environment variable, named in its help; the option wins.")
    parser.add_argument("--tracking-uri", default=os.environ.get(TRACKING_VARIABLE),
                        help=f"the MLflow registry to serve from (default: ${TRACKING_VARIABLE})")
    parser.add_argument("--model", default=os.environ.get(MODEL_VARIABLE, DEFAULT_MODEL),
                        help=f"the registered model to serve (default: ${MODEL_VARIABLE}, else {DEFAULT_MODEL})")
    parser.add_argument("--onnx-file", help="serve this file instead of a registry alias (no reloads)")
    parser.add_argument("--cache-dir", help="the folder for downloaded versions and TensorRT engines (in tensorrt/) "
                                            f"(default: ${CACHE_VARIABLE}, else ~/.cache/graft)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help=f"listen beyond loopback without an API token (${TOKEN_VARIABLE})")
    add_options(parser, environment=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    options = argument_parser()
    args = options.parse_args(argv)
    try:
        serving = serving_from(args, environ=os.environ)
    except SettingsError as error:  # exit 2, naming the option or variable and what it allows
        options.error(str(error))
    settings = ServerSettings(serving=serving, model_name=args.model, cache_dir=str(args.cache_dir or default_cache_dir()),
                              token=os.environ.get(TOKEN_VARIABLE, ""))
    try:
        serve(build_source(args.tracking_uri, args.model, serving.alias, args.onnx_file, settings.cache_dir), settings,
              insecure=args.insecure_no_auth)
    except (BindRefused, SourceError) as error:  # a port in use, no such store, no server at the URI: said in a line
        print(f"graft-server: error: {error}", file=sys.stderr)
        raise SystemExit(75 if isinstance(error, RegistryUnreachable) else 2) from None


if __name__ == "__main__":
    main()
