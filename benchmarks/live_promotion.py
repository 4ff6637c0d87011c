"""Live promotion under load: the real server following a registry while aliases and canary shares move.

    .venv/bin/graft run    # a registry (mlflow.db) whose champion is v1
    .venv/bin/python benchmarks/live_promotion.py --moves --seconds 60 --every 5 --concurrency 32
    .venv/bin/python benchmarks/live_promotion.py --shadow --seconds 3 --rounds 12 [--shadow-cpu-share 1 | --control]

Both work on a copy of the project's registry (mlflow.db, in a temporary folder: the project's own is not touched)
holding a second version registered from the champion's own files and tags (the same bytes, another version number:
what is checked is which version answered), made the challenger.

--moves: one server (`python -m deploy.server`, poll 0.5 s, canary on) under c=32 binary V2 requests for --seconds,
while every --every seconds the registry changes through Graft's own audited calls, in turn: a canary share of 25%,
the champion swapped (the challenger alias to the old champion), the share to 0, the champion swapped back, a share
of 50%, ... Each change is scheduled LEAD_SECONDS ahead (serving.switch_lead_seconds): the registry's timeline is
the changes' scheduled moments. Every answer's status and X-Model-Version are kept with when it was sent and
received; an answer is counted "not live" when its version was neither the champion nor (share above 0) the canary
at any moment from when it was sent to when it was received, with how long after the registry retired that version
it was sent. The server's own lateness for each change (graft_traffic_switch_late_seconds) is kept too. Results:
benchmarks/results/live_moves.json.

--shadow: two servers side by side, shadow off and shadow on (the challenger shadowing the answers its
serving.shadow.cpu_share of a core allows, or --shadow-cpu-share), driven in turn in alternating rounds, fresh pairs
each round, at paced rates below the machine's capacity (--rates, over 8 connections): the champion's p50 and p99
latency with and without the shadow, the difference with its standard error from the rounds, and the share of
answers shadowed. --control runs the same with the shadow off on both servers: the noise between two servers that
differ in nothing, against which "within noise" is read. (Closed-loop load at saturation measures something else:
the shadow's model calls take CPU from the champion's on the same cores.) Results:
benchmarks/results/live_shadow.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_benchmark import _free_port, _metric, _request_bytes  # noqa: E402  (a lean load generator, shared)

from components.registry import CHALLENGER, CHAMPION, alias_version, move_alias, set_canary_share  # noqa: E402
from deploy.cpu import cpu_description  # noqa: E402

POLL_SECONDS = 0.5
LEAD_SECONDS = 1.5  # serving.switch_lead_seconds of the changes made: a poll and a load (about 0.3 s here) ahead
ROWS = np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32)  # the default champion's input


def registry_copy(workspace: Path, folder: Path, name: str) -> str:
    """The project's sqlite registry copied into `folder`, with a second version (the champion's files and tags)
    as the challenger; its tracking URI. The copy's artifact paths still point into the project (read only)."""
    shutil.copy(workspace / "mlflow.db", folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise SystemExit(f"{workspace / 'mlflow.db'} has no {name}@{CHAMPION}: run `graft run` first")
    first = client.get_model_version(name, champion)
    second = client.create_model_version(name, first.source, first.run_id, tags=first.tags)
    move_alias(client, name, CHALLENGER, second.version, "challenger", "benchmark: the champion's files again")
    return uri


def start_server(uri: str, name: str, *options: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    cache = Path(uri.removeprefix("sqlite:///")).parent / "cache"
    server = subprocess.Popen(
        [sys.executable, "-m", "deploy.server", "--tracking-uri", uri, "--model", name, "--port", str(port),
         "--providers", "cpu", "--poll-seconds", str(POLL_SECONDS), "--cache-dir", str(cache),
         "--grpc-port", "0", *options],  # no gRPC port: two servers side by side would both ask for 8001
        stdout=open(Path(uri.removeprefix("sqlite:///")).parent / f"server-{port}.log", "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return server, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    raise SystemExit("the server did not become ready in 60 s")


async def _answers(port: int, request: bytes, deadline: float, answers: list[tuple[float, float, int, str]]) -> None:
    """One keep-alive connection: (sent, received, status, X-Model-Version) of each answer, on time.time(); a
    connection the server drops counts as an answer with status 0 (and the client connects again)."""
    while time.time() < deadline:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.time() < deadline:
                sent = time.time()
                writer.write(request)
                status = int((await reader.readline()).split()[1])
                length, version = 0, ""
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    key, _, value = line.decode().partition(":")
                    if key.lower() == "content-length":
                        length = int(value)
                    elif key.lower() == "x-model-version":
                        version = value.strip()
                await reader.readexactly(length)
                answers.append((sent, time.time(), status, version))
        except (OSError, IndexError, asyncio.IncompleteReadError) as error:
            answers.append((sent, time.time(), 0, repr(error)))
        finally:
            writer.close()


def _live_at(timeline: list[tuple[float, set[str]]], start: float, end: float) -> set[str]:
    """Every version live at some moment in [start, end]: the state at start, and every state that began before end."""
    live = set()
    for index, (since, versions) in enumerate(timeline):
        until = timeline[index + 1][0] if index + 1 < len(timeline) else float("inf")
        if since <= end and until >= start:
            live |= versions
    return live


def _retired(timeline: list[tuple[float, set[str]]], version: str, at: float) -> float:
    """When `version` last stopped being live before `at`."""
    retired = timeline[0][0]
    for (_, before), (since, after) in zip(timeline, timeline[1:]):
        if since <= at and version in before and version not in after:
            retired = since
    return retired


async def moves(uri: str, name: str, seconds: float, every: float, concurrency: int) -> dict:
    client = MlflowClient(tracking_uri=uri)
    server, port = start_server(uri, name, "--variant", "fp32")
    try:
        shape = httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}").json()["inputs"][0]["shape"][1:]
        request = _request_bytes(port, np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32), True,
                                 name)
        champion, challenger = alias_version(client, name, CHAMPION), alias_version(client, name, CHALLENGER)
        timeline = [(time.time(), {champion})]  # (since, live versions) as the registry stated them
        answers: list[tuple[float, float, int, str]] = []
        deadline = time.time() + seconds
        load = asyncio.gather(*(_answers(port, request, deadline, answers) for _ in range(concurrency)))
        made, share, step = [], 0.0, 0
        while time.time() + every < deadline:
            await asyncio.sleep(every)
            kind = ("share 25", "swap", "share 0", "swap", "share 50", "swap", "share 0")[step % 7]
            step += 1
            if made:  # how late the server took the change before (its own count, /metrics)
                metrics = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics")).text
                made[-1]["late_s"] = _metric(metrics, "graft_traffic_switch_late_seconds")
            if kind == "swap":  # the challenger becomes the champion and the champion the challenger
                await asyncio.to_thread(move_alias, client, name, CHAMPION, challenger, "promote", "benchmark: swap",
                                        lead_seconds=LEAD_SECONDS)
                move = await asyncio.to_thread(move_alias, client, name, CHALLENGER, champion, "challenger",
                                               "benchmark: swap", lead_seconds=LEAD_SECONDS)
                champion, challenger = challenger, champion
            else:
                share = float(kind.split()[1])
                move = await asyncio.to_thread(set_canary_share, client, name, CHALLENGER, share, "canary",
                                               "benchmark", LEAD_SECONDS)
            effective = datetime.fromisoformat(move.effective).timestamp()  # the change's scheduled moment
            timeline.append((effective, {champion, challenger} if share > 0 else {champion}))
            made.append({"at": round(effective - timeline[0][0], 3), "move": kind, "champion": champion,
                         "canary": challenger if share > 0 else None})
        await load
    finally:
        server.terminate()
        server.wait(timeout=20)
    failed = [a for a in answers if a[2] != 200]
    if failed:
        print("not 2xx:", failed[:5], file=sys.stderr)
    not_live = [a for a in answers if a[2] == 200 and a[3] not in _live_at(timeline, a[0], a[1])]
    by_version: dict[str, int] = {}
    for _, _, _, version in answers:
        by_version[version] = by_version.get(version, 0) + 1
    return {"cpu": cpu_description(), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
            "seconds": seconds, "every": every, "concurrency": concurrency, "poll_seconds": POLL_SECONDS,
            "switch_lead_seconds": LEAD_SECONDS,
            "requests": len(answers), "throughput_rps": round(len(answers) / seconds, 1),
            "non_2xx": len(failed), "answered_by_a_version_not_live": len(not_live), "answers_by_version": by_version,
            # how long after the registry retired its version each such answer was sent: a swap keeps the old
            # version answering until the new one is loaded and warm
            "not_live_lag_s": sorted(round(a[0] - _retired(timeline, a[3], a[0]), 3) for a in not_live),
            "moves": made}


async def _paced(port: int, request: bytes, rate: float, seconds: float, connections: int = 8) -> dict:
    """Requests at `rate` a second in all, spread over `connections` keep-alive connections (each waits for its next
    turn): load below what the machine can do, so that a latency change is the shadow's doing, not a queue's."""
    latencies: list[float] = []
    started = time.perf_counter()

    async def connection(offset: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        turn = started + offset
        try:
            while turn < started + seconds:
                await asyncio.sleep(max(0.0, turn - time.perf_counter()))
                sent = time.perf_counter()
                writer.write(request)
                assert b" 200 " in await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - sent)
                turn += connections / rate
        finally:
            writer.close()

    await asyncio.gather(*(connection(index / rate) for index in range(connections)))
    ordered = sorted(latencies)
    return {"requests": len(ordered), "p50_ms": 1000 * ordered[len(ordered) // 2],
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]}


def _compared(port: int) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return next((float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('graft_shadow_requests_total{outcome="compared"}')), 0.0)


def _difference(off: list[float], on: list[float]) -> dict:
    """on - off over the rounds, paired by round (a round's two servers ran within seconds of each other, so the
    host's own drift cancels), with its standard error: within noise when under two of them."""
    differences = [b - a for a, b in zip(off, on)]
    error = statistics.stdev(differences) / len(differences) ** 0.5
    mean = statistics.fmean(differences)
    return {"ms": mean, "standard_error_ms": error, "within_noise": abs(mean) < 2 * error}


def shadow(uri: str, name: str, seconds: float, rounds: int, rates: tuple[float, ...], cpu_share: float | None,
           control: bool) -> dict:
    options = () if control else ("--shadow-enabled",
                                  *(("--shadow-cpu-share", str(cpu_share)) if cpu_share is not None else ()))
    cases = []
    for rate in rates:
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for round_ in range(rounds):
            servers = {}  # started in turn too: the second of two servers started may sit worse on the cores
            try:
                for side in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    servers[side] = start_server(uri, name, *(options if side == "on" else ()))
                port = servers["on"][1]
                wait = time.monotonic() + 30
                while not control and _compared(port) == 0 and time.monotonic() < wait:  # the shadow comparing
                    asyncio.run(_paced(port, _request_bytes(port, ROWS, True, name), 50, 0.2))
                for side in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    time.sleep(0.5)  # the other server's ONNX Runtime threads stop spinning
                    port = servers[side][1]
                    request = _request_bytes(port, ROWS, True, name)
                    asyncio.run(_paced(port, request, rate, 0.5))  # warm
                    compared = _compared(port)
                    runs[side].append(asyncio.run(_paced(port, request, rate, seconds)))
                    runs[side][-1]["shadowed"] = _compared(port) - compared
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait(timeout=20)
        mean = {side: {key: statistics.fmean(run[key] for run in runs[side]) for key in ("p50_ms", "p99_ms")}
                for side in runs}
        error = {side: statistics.stdev(run["p50_ms"] for run in runs[side]) / len(runs[side]) ** 0.5 for side in runs}
        cases.append({"rate": rate, "rounds": rounds, "off": mean["off"], "on": mean["on"],
                      "p50_standard_error_ms": error,
                      **{f"{key}_on_minus_off": _difference([run[f"{key}_ms"] for run in runs["off"]],
                                                           [run[f"{key}_ms"] for run in runs["on"]])
                         for key in ("p50", "p99")},
                      "shadowed_share": sum(r["shadowed"] for r in runs["on"]) / sum(r["requests"] for r in runs["on"]),
                      "runs": runs})  # each round's, in order: what pooling several runs needs
    return {"cpu": cpu_description(), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
            "seconds_per_round": seconds, "control": control,
            "shadow_cpu_share": cpu_share or "serving.shadow.cpu_share (params.yaml)",
            "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path("."), help="a project after `graft run`")
    parser.add_argument("--model", default="graft-classifier", help="its registry.model_name")
    parser.add_argument("--moves", action="store_true", help="alias moves and share changes under load")
    parser.add_argument("--shadow", action="store_true", help="the champion's latency, shadow off against on")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=5.0, help="--moves: seconds between registry changes")
    parser.add_argument("--concurrency", type=int, default=32, help="--moves: connections")
    parser.add_argument("--rounds", type=int, default=8, help="--shadow: alternating rounds per request rate")
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 300], help="--shadow: requests a second")
    parser.add_argument("--shadow-cpu-share", type=float, help="--shadow: the shadow's share of a core (1: every "
                                                               "answer shadowed; default: the server's setting)")
    parser.add_argument("--control", action="store_true", help="--shadow: the shadow off on both servers (the noise)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="graft-live-")  # kept when the run fails: the servers' logs are there
    uri = registry_copy(args.workspace.resolve(), Path(folder), args.model)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    if args.moves:
        summary = asyncio.run(moves(uri, args.model, args.seconds, args.every, args.concurrency))
        (results / "live_moves.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{summary['requests']} requests in {args.seconds:g} s ({summary['throughput_rps']} req/s) across "
              f"{len(summary['moves'])} registry changes: {summary['non_2xx']} non-2xx, "
              f"{summary['answered_by_a_version_not_live']} answered by a version not live; by version "
              f"{summary['answers_by_version']}")
    if args.shadow:
        summary = shadow(uri, args.model, args.seconds, args.rounds, tuple(args.rates), args.shadow_cpu_share,
                         args.control)
        (results / "live_shadow.json").write_text(json.dumps(summary, indent=2) + "\n")
        for case in summary["cases"]:
            print(f"{case['rate']:g} req/s: the champion's p50 {case['off']['p50_ms']:.3f} -> {case['on']['p50_ms']:.3f} "
                  f"ms (+- {case['p50_standard_error_ms']['off']:.3f} / {case['p50_standard_error_ms']['on']:.3f}), "
                  f"p99 {case['off']['p99_ms']:.2f} -> {case['on']['p99_ms']:.2f} ms with the shadow on "
                  f"({case['shadowed_share']:.0%} of the answers shadowed); on - off: p50 "
                  + ", p99 ".join(f"{d['ms']:+.3f} ms (+- {d['standard_error_ms']:.3f}, "
                                  f"{'within' if d['within_noise'] else 'beyond'} noise)"
                                  for d in (case["p50_on_minus_off"], case["p99_on_minus_off"])))
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
