"""Can two processes of one Optuna study both take the same queued trial? What `graft tune` on Dask does at its
start: a new study's first trial (params.yaml's own values) is queued, then every worker process asks for a trial.

Each round: a new study with one queued trial; two processes that have both loaded the study are released at the
same instant (an Event) and each runs 2 trials of a 50 ms objective. A round fails when a process is refused its own
result because the other ran the same trial ("Cannot tell a COMPLETE trial", "Trial#0 has already finished").

    .venv/bin/python benchmarks/tune_storage_race.py --storage sqlite --rounds 60
    .venv/bin/python benchmarks/tune_storage_race.py --storage journal --rounds 60

On 2026-12-06 (Intel Xeon with AMX, AVX-512 F/BF16/VNNI, 2 cores, Optuna 5.1): SQLite 10 rounds of 60 failed (8 of
60, 1 of 30 in the sketch before it), the journal file 0 of 60 (twice). SQLite takes no row lock, so both processes
can read the trial as queued before either marks it running; the journal file's lock makes the read and the mark one
step. components/tune.py uses the journal file by default and refuses SQLite with tune.executor dask.
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend


def storage(kind: str, path: str):
    return f"sqlite:///{path}.db" if kind == "sqlite" else JournalStorage(JournalFileBackend(f"{path}.journal"))


def worker(kind: str, path: str, start, number: int, results) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=storage(kind, path),
                              sampler=optuna.samplers.TPESampler(seed=number, constant_liar=True))
    study.trials  # the study read before the start, as a worker that just loaded it
    start.wait()
    try:
        study.optimize(lambda trial: (time.sleep(0.05), trial.suggest_float("x", 0, 1))[1], n_trials=2, catch=())
        results.put("ok")
    except Exception as error:  # noqa: BLE001 (what a worker's failure looks like is the measurement)
        results.put(repr(error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", choices=["sqlite", "journal"], required=True)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    context = multiprocessing.get_context("spawn")
    failed = 0
    with tempfile.TemporaryDirectory() as folder:
        for round_number in range(args.rounds):
            path = f"{folder}/study-{round_number}"
            optuna.create_study(study_name="race", storage=storage(args.storage, path),
                                direction="maximize").enqueue_trial({"x": 0.5})
            start, results = context.Event(), context.Queue()
            processes = [context.Process(target=worker, args=(args.storage, path, start, n, results)) for n in (0, 1)]
            for process in processes:
                process.start()
            time.sleep(1.5)  # both have loaded the study
            start.set()
            for process in processes:
                process.join()
            outcomes = [results.get() for _ in processes]
            if any(outcome != "ok" for outcome in outcomes):
                failed += 1
                print(f"round {round_number}: {outcomes}", flush=True)
    print(f"{args.storage}: {failed} of {args.rounds} rounds failed")


if __name__ == "__main__":
    main()
