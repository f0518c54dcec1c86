"""The `skinsense` command. Argument parsing lives here and only here.

`skinsense pipeline` runs the Prefect flow of the top-level `flows` package; it is imported
only when that command runs, so `skinsense` itself never imports prefect.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_synth(args: argparse.Namespace) -> int:
    from skinsense.data.synth import make_synthetic_ham10000

    out = make_synthetic_ham10000(Path(args.out), n_images=args.images, seed=args.seed,
                                  isic_test_images=args.isic_test_images,
                                  near_duplicates=args.near_duplicates)
    print(f"wrote a synthetic HAM10000-format sample of {args.images} images to {out}")
    return 0


def _data_config(args: argparse.Namespace):
    from skinsense.config import DataConfig

    fields = {"source": args.source, "include_isic_test": args.isic_test, "refresh": args.refresh}
    if getattr(args, "dataverse_url", None):
        fields["dataverse_url"] = args.dataverse_url
    return DataConfig(**fields)


def at_terminal() -> bool:
    """True when a person runs the command at a terminal (not a scheduler, a pipe or CI)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def _fail_fast_offline(cfg) -> None:
    """At a terminal, stop at once when Dataverse's host name does not resolve.

    Scheduled and deployment runs keep the fetch's long retries, where an outage may pass;
    a person offline should hear within seconds that a local copy is the way.
    """
    if cfg.source.strip().lower() == "dataverse" and at_terminal():
        from skinsense.data.dataverse import check_host_resolves

        check_host_resolves(cfg.dataverse_url)


def cmd_fetch(args: argparse.Namespace) -> int:
    from skinsense import stages
    from skinsense.paths import Home

    home = Home.default()
    _fail_fast_offline(_data_config(args))
    fetched = stages.fetch_data(_data_config(args), home)
    validated = stages.validate_data(fetched, _data_config(args), home)
    print(f"metadata: {fetched.metadata_csv}\nimages:   {fetched.images_dir}")
    print(f"validated {validated.n_images} images ({validated.n_bad} left out), "
          f"fingerprint {validated.fingerprint[:16]}, manifest {validated.manifest_csv}")
    for line in validated.bad_images[:20]:
        print(f"  left out: {line}")
    from skinsense.data.duplicates import describe

    print(describe(validated.near_duplicates))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from skinsense.config import NearDuplicateConfig
    from skinsense.data.duplicates import describe
    from skinsense.data.records import SPLIT_GROUP_COLUMN
    from skinsense.data.split import write_split

    metadata, found = Path(args.metadata), None
    if args.images:
        # The validate stage's check: each image decoded once, lesions linked by
        # near-duplicate images kept in one part.
        from skinsense.data.metadata import validate
        from skinsense.data.records import FetchedData

        validated = validate(
            FetchedData(source=args.images, metadata_csv=metadata, images_dir=Path(args.images)),
            out_dir=Path(args.out) / "validated", max_bad_fraction=args.max_bad_fraction,
            near_duplicates=NearDuplicateConfig(enabled=not args.no_near_duplicates))
        metadata, found = validated.manifest_csv, validated.near_duplicates
    split = write_split(metadata, Path(args.out), seed=args.seed,
                        val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    if found is not None or args.images:
        print(describe(found))
    else:
        import pandas as pd

        columns = pd.read_csv(metadata, nrows=0).columns
        print("near-duplicates across lesions: " + (
            f"grouped as in the manifest's {SPLIT_GROUP_COLUMN} column"
            if SPLIT_GROUP_COLUMN in columns else
            "not checked (pass --images DIR to look for them before splitting)"))
    for part, counts in split.class_counts.items():
        print(f"{part}: {sum(counts.values())} images " +
              " ".join(f"{code}={n}" for code, n in counts.items()))
    print(f"wrote train.csv, val.csv, test.csv to {args.out}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from skinsense.config import PipelineConfig

    # Only what was given on the command line overrides --config (and the defaults).
    cfg: dict = {"data": {}, "train": {}, "serve": {}}
    if args.data_source is not None:
        cfg["data"]["source"] = args.data_source
    if args.no_deploy:
        cfg["serve"]["deploy"] = False
    if args.archs:
        cfg["train"]["archs"] = _csv_list(args.archs)
    for name in ("epochs", "image_size", "batch_size", "lr"):
        if getattr(args, name) is not None:
            cfg["train"][name] = getattr(args, name)
    if args.no_pretrained:
        cfg["train"]["pretrained"] = False
    if args.weights:
        cfg["train"]["weights_path"] = args.weights
    if args.port is not None:
        cfg["serve"]["port"] = args.port
    if args.config:
        cfg = _deep_merge(json.loads(Path(args.config).read_text()), cfg)
    if os.environ.get(APP_PORT_ENV) and "port" not in cfg.get("serve", {}):
        cfg["serve"]["port"] = _env_port()
    config = PipelineConfig.model_validate(cfg)
    _fail_fast_offline(config.data)
    flows = importlib.import_module("flows.pipeline")
    result = flows.run_pipeline(config, refresh_data=args.refresh_data)
    print(json.dumps(result, indent=2, default=str))
    return 0


# The app's port when --port is not given (the stack passes it to its runner the same way).
APP_PORT_ENV = "SKINSENSE_APP_PORT"


def _env_port() -> int:
    raw = os.environ[APP_PORT_ENV]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{APP_PORT_ENV}={raw!r} is not a port number; set it to e.g. 7860 "
                         f"or unset it") from None


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def cmd_serve(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from skinsense.lifecycle import tracking
    from skinsense.paths import Home
    from skinsense.serving.app import serve, serve_config_from_env

    uri = tracking.configure(Home.default())
    cfg = serve_config_from_env()
    if getattr(args, "precision", None):
        cfg = cfg.model_copy(update={"precision": args.precision})
    try:
        serve(args.model_uri, host=args.host, port=args.port, cfg=cfg)
    except MlflowException as exc:
        if refused := tracking.refusal_message(exc, uri):
            raise RuntimeError(refused) from exc
        raise RuntimeError(
            f"cannot load {args.model_uri!r} from MLflow at {uri}: {exc.message}. Pass a "
            f"registered model URI (models:/NAME@champion, models:/NAME/VERSION; "
            f"`skinsense registry show` lists them) or a model folder path, and check "
            f"MLFLOW_TRACKING_URI / SKINSENSE_HOME") from exc
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from skinsense.lifecycle import tracking
    from skinsense.paths import Home

    uri = tracking.configure(Home.default())
    try:
        return _registry_action(args)
    except MlflowException as exc:
        if refused := tracking.refusal_message(exc, uri):
            raise RuntimeError(refused) from exc
        raise


def _registry_action(args: argparse.Namespace) -> int:
    from skinsense.lifecycle import registry

    if args.action == "show":
        _print_versions(args.name, registry.show(args.name))
    elif args.action == "promote":
        change = registry.promote(args.name, args.version, args.reason)
        print(f"{args.name} v{change.version} is the champion (was "
              f"{'v' + change.previous_champion if change.previous_champion else 'none'}): "
              f"{change.reason}")
    else:
        change = registry.rollback(args.name)
        print(f"{args.name}: champion rolled back from v{change.previous_champion} "
              f"to v{change.version}")
    return 0


def _print_versions(name: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"registered model {name}")
    for column in ("version", "aliases", "arch", "test metrics", "data", "created",
                   "decision"):
        table.add_column(column, overflow="fold")
    # Calibration, referral and subgroup figures have a table of their own below.
    own_table = ("test_referral", "test_gap_", "test_ece", "test_nll", "test_ood")
    for row in rows:
        metrics = " ".join(f"{k.removeprefix('test_')}={_short_number(v)}"
                           for k, v in row["metrics"].items() if not k.startswith(own_table))
        decision = row["promotion_decision"] or ""
        if row["previous_champion"]:
            decision += f" (replaced v{row['previous_champion']})"
        if row["rollback"]:
            decision += f"; {row['rollback']}"
        table.add_row(row["version"], ", ".join(row["aliases"]), row["arch"] or "", metrics,
                      (row["dataset_fingerprint"] or "")[:12], row["created"] or "", decision)
    console = Console()
    console.print(table)
    calibrated = [row for row in rows if row.get("temperature") is not None]
    if not calibrated:
        return
    figures = Table(title=f"{name}: calibration, referral rule (test part, 95% CI over "
                          f"lesions), out-of-domain gate and largest subgroup gaps")
    for column in ("version", "calibration", "referral", "out-of-domain gate",
                   "largest subgroup gaps"):
        figures.add_column(column, overflow="fold")
    for row in calibrated:
        figures.add_row(row["version"], _calibration_cell(row), _referral_cell(row),
                        _gate_cell(row), _gaps_cell(row["metrics"]))
    console.print(figures)


def _calibration_cell(row: dict) -> str:
    if row.get("temperature") is None:
        return "none"
    metrics = row["metrics"]
    if row.get("calibration_helped") == "false":
        # Fitted, but it made the test part worse: say what was done, not "calibrated".
        return f"{row['calibration']}: did not help, not called calibrated"
    text = f"T={_short_number(row['temperature'])}"
    if "test_ece" in metrics:
        text += (f" ECE {_short_number(metrics.get('test_ece_uncalibrated', '?'))}"
                 f"->{_short_number(metrics['test_ece'])}")
    if "test_nll" in metrics:
        text += (f" NLL {_short_number(metrics.get('test_nll_uncalibrated', '?'))}"
                 f"->{_short_number(metrics['test_nll'])}")
    return text


def _referral_cell(row: dict) -> str:
    if row.get("referral_threshold") is None:
        return "no rule"
    metrics = row["metrics"]
    text = (f"score>={_short_number(row['referral_threshold'])} (chosen for "
            f"{_short_number(row['referral_sensitivity_target'])} val. sensitivity)")
    for name in ("sensitivity", "specificity"):
        if f"test_referral_{name}" in metrics:
            text += (f" {name} {_short_number(metrics[f'test_referral_{name}'])} "
                     f"{metrics.get(f'test_referral_{name}_ci', '')}").rstrip()
    return text


def _gate_cell(row: dict) -> str:
    if row.get("ood_threshold") is None:
        return "none"
    metrics = row["metrics"]
    if row.get("ood_gate_status") == "unusable":
        return (f"UNUSABLE, served without it: {row.get('ood_gate_reason') or 'no reason'}"
                + "".join(f" {label} {_short_number(metrics[key])}" for key, label in
                          (("test_ood_auroc", "AUROC"), ("test_ood_rate", "test refused"))
                          if key in metrics))
    percentile = row.get("ood_percentile")
    text = (f"score<={_short_number(row['ood_threshold'])} "
            f"({float(percentile):g}th pct. of val.)" if percentile else
            f"score<={_short_number(row['ood_threshold'])}")
    for key, label in (("test_ood_auroc", "AUROC"), ("test_ood_fpr_at_95_tpr", "FPR@95%TPR"),
                       ("test_ood_rate", "test refused")):
        if key in metrics:
            text += f" {label} {_short_number(metrics[key])}"
    return text


def _gaps_cell(metrics: dict) -> str:
    return " ".join(f"{k.removeprefix('test_gap_')}={_short_number(v)}"
                    for k, v in metrics.items() if k.startswith("test_gap_"))


def _short_number(text: str) -> str:
    try:
        return f"{float(text):.4f}"
    except ValueError:
        return text


def cmd_stack(args: argparse.Namespace) -> int:
    from skinsense import stack
    from skinsense.paths import Home

    home = Home.default()
    if args.action == "up":
        records = stack.up(home, host=args.host, prefect_port=args.prefect_port,
                           mlflow_port=args.mlflow_port, app_port=args.app_port,
                           with_app=not args.no_app, workers=args.workers,
                           prefect_database_url=args.prefect_database_url,
                           mlflow_backend_store_uri=args.mlflow_backend_store_uri,
                           mlflow_auth_database_uri=args.mlflow_auth_database_uri,
                           auth=args.auth)
        print(stack.format_status(records))
        print(_stack_settings(stack.describe(home)))
        print(f"logs and pid files: {stack.stack_dir(home)}")
    elif args.action == "status":
        records = stack.status(home)
        print(stack.format_status(records))
        print(_stack_settings(stack.describe(home)))
        return 0 if all(r["running"] for r in records if r["name"] != stack.APP) else 3
    else:
        stopped = stack.down(home)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_train_node(args: argparse.Namespace) -> int:
    from skinsense.training.launcher import join_training

    join_training(Path(args.spec))
    print("this node's part of the training ended")
    return 0


def _stack_settings(described: dict) -> str:
    databases = described["databases"]
    lines = [f"Prefect database: {databases.get('prefect') or 'SQLite in PREFECT_HOME'}",
             f"MLflow backend store: {databases.get('mlflow') or '-'}"]
    if described["auth"]:
        path = described["credentials"]
        lines += [f"MLflow users: {databases.get('mlflow-auth') or '-'}",
                  f"logins: on; credentials in {path} (mode 0600). In a shell: "
                  f"set -a; . {path}; set +a"]
    else:
        lines.append("logins: off (loopback only; --auth or a non-loopback --host turns them on)")
    return "\n".join(lines)


def cmd_deploy(args: argparse.Namespace) -> int:
    # Imported only here: `skinsense` itself never imports prefect.
    importlib.import_module("deployments.serve").main()
    return 0


def _add_data_commands(sub) -> None:  # noqa: ANN001 (argparse's private subparsers type)
    """`synth`, `fetch` and `split`: the data steps a person may run by hand."""
    p = sub.add_parser("synth", help="write a synthetic HAM10000-format sample")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--images", type=int, default=10015)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isic-test-images", type=int, default=0,
                   help="also write an ISIC 2018 Task 3 style test set of this many images")
    p.add_argument("--near-duplicates", type=_non_negative, default=0, metavar="N",
                   help="plant N near-duplicates (altered copies of images under new lesion "
                        "ids), listed in planted_near_duplicates.csv")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("fetch", help="download (or read) and validate HAM10000")
    p.add_argument("--source", default="dataverse", help="'dataverse' or a local folder/zip")
    p.add_argument("--dataverse-url", help="Dataverse base URL (env SKINSENSE_DATAVERSE_URL)")
    p.add_argument("--isic-test", action="store_true", help="also fetch the ISIC 2018 test set")
    p.add_argument("--refresh", action="store_true", help="verify and extract everything again")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("split", help="lesion-level train/val/test split of a metadata CSV")
    p.add_argument("--metadata", required=True, help="HAM10000_metadata.csv")
    p.add_argument("--out", required=True, help="folder for train.csv, val.csv, test.csv")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--images", help="folder of the images ({image_id}.jpg): find near-duplicate "
                                    "images across lesion_ids and keep their lesions together")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="with --images: fail when more images than this are unreadable")
    p.add_argument("--no-near-duplicates", action="store_true",
                   help="with --images: only check the images, do not group near-duplicates")
    p.set_defaults(func=cmd_split)


def _add_pipeline_command(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("pipeline", help="run the whole Prefect flow")
    p.add_argument("--data-source", help="'dataverse' (default) or a local folder/zip")
    p.add_argument("--archs", help="comma-separated, default efficientnet_b0,efficientnet_b3,maxvit_t")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int, help="one input size for every architecture")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 3e-4, for "
                                            "fine-tuning pretrained weights)")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument("--weights", help="local file with ImageNet weights for the architecture")
    p.add_argument("--port", type=int, help="port of the deployed app (default 7860)")
    p.add_argument("--no-deploy", action="store_true", help="do not start the app at the end")
    p.add_argument("--refresh-data", action="store_true",
                   help="run the data stages again instead of reusing their cached results")
    p.add_argument("--config", help="JSON file with a full PipelineConfig (flags override it)")
    p.set_defaults(func=cmd_pipeline)


def _add_serve_command(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("serve", help="serve the Gradio app")
    p.add_argument("--model-uri", default="models:/skinsense@champion",
                   help="registered model URI or an exported model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--precision", choices=["auto", "int8", "fp32"], default=None,
                   help="serve.precision: auto (int8 where the evaluation allowed it), or force "
                        "one (default: $SKINSENSE_SERVE_CONFIG's, else auto)")
    p.set_defaults(func=cmd_serve)


def _add_registry_command(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("registry", help="show, promote or roll back registered model versions")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("show", help="list versions with aliases, metrics and decisions")
    a.add_argument("--name", default="skinsense", help="registered model name")
    a = actions.add_parser("promote", help="make a version the champion by hand")
    a.add_argument("version", help="the model version to promote, e.g. 3")
    a.add_argument("--name", default="skinsense", help="registered model name")
    a.add_argument("--reason", default="", help="why (recorded on the version)")
    a = actions.add_parser("rollback", help="move the champion back to the one it replaced")
    a.add_argument("--name", default="skinsense", help="registered model name")
    p.set_defaults(func=cmd_registry)


def _add_stack_command(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("stack", help="local Prefect + MLflow servers, deployment runner and app")
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; 0.0.0.0 exposes the UIs)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--app-port", type=int, default=7860)
    p.add_argument("--no-app", action="store_true", help="do not start the app")
    p.add_argument("--workers", type=_non_negative, default=0, metavar="N",
                   help="also start N process workers on the work pool skinsense-gpu (and "
                        "deploy train-architecture there) for pipelines with train.fan_out")
    p.add_argument("--prefect-database-url",
                   help="Prefect's database, e.g. postgresql+asyncpg://USER:PASSWORD@HOST:5432/"
                        "prefect (env PREFECT_API_DATABASE_CONNECTION_URL; default SQLite in "
                        "PREFECT_HOME). With a password, prefer the env variable: other users "
                        "of the machine see command lines in `ps`")
    p.add_argument("--mlflow-backend-store-uri",
                   help="MLflow's runs and registry, e.g. postgresql://USER:PASSWORD@HOST:5432/"
                        "mlflow (env MLFLOW_BACKEND_STORE_URI, better with a password; "
                        "default $SKINSENSE_HOME/mlflow/mlflow.db)")
    p.add_argument("--mlflow-auth-database-uri",
                   help="MLflow's user database when logins are on (env "
                        "MLFLOW_AUTH_DATABASE_URI; default $SKINSENSE_HOME/mlflow/auth.db)")
    p.add_argument("--auth", action="store_true",
                   help="turn on Prefect's and MLflow's logins on loopback too (always on for "
                        "any other --host); secrets from PREFECT_SERVER_API_AUTH_STRING, "
                        "MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY, "
                        "else generated into $SKINSENSE_HOME/stack/credentials.env")
    p.set_defaults(func=cmd_stack)


def _add_train_node_command(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("train-node",
                       help="join a multi-node training (train.num_nodes > 1) from this machine")
    p.add_argument("spec", help="the train_spec.json that the first node printed (on the "
                                "shared SKINSENSE_HOME)")
    p.set_defaults(func=cmd_train_node)


def _add_deploy_command(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("deploy", help="Prefect deployments of the pipeline")
    p.add_argument("action", choices=["serve"],
                   help="serve: register 'manual' and 'scheduled-retraining' and run them "
                        "from this process (needs PREFECT_API_URL)")
    p.set_defaults(func=cmd_deploy)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinsense",
        description="Train, register and serve a HAM10000 skin-lesion classifier. "
        "All state lives under $SKINSENSE_HOME (default ./skinsense_home); MLflow at "
        "$MLFLOW_TRACKING_URI when set.")
    sub = parser.add_subparsers(dest="command", required=True)
    # One function per command group; the order here is the order of `skinsense --help`.
    for add in (_add_data_commands, _add_pipeline_command, _add_serve_command,
                _add_registry_command, _add_stack_command, _add_train_node_command,
                _add_deploy_command):
        add(sub)
    from skinsense.monitoring.cli import add_parser as add_feedback_parser

    add_feedback_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every call of the Prefect client to its server, one line each: noise at a terminal.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:
        print(f"skinsense {args.command}: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"skinsense {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
