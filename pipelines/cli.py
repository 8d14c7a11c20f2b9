"""``notellm2`` — the command line. It only translates arguments; the work is in the library."""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from components.common.config import PRESETS, ConfigError
from components.common.schema import DataError


def _fail(msg: str) -> None:
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="notellm2-kfp")
def main() -> None:
    """Train, evaluate and ship NoteLLM-2 note representations with Kubeflow Pipelines."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


@main.command("make-demo-data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--notes", default=1200, show_default=True, help="Number of notes.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same data).")
@click.option("--kinds", default="both=0.4,image_only=0.3,text_only=0.3", show_default=True,
              help="Share of each pair kind: related in both modalities, by picture only, by "
                   "wording only.")
@click.option("--one-modality-distractors", is_flag=True,
              help="Give every pair's first note two look-alikes that match it in one modality "
                   "only (with --kinds both=1: only the partner matches in both).")
def make_demo_data_cmd(out: str, notes: int, seed: int, kinds: str,
                       one_modality_distractors: bool) -> None:
    """Write a synthetic multimodal data set in the official NoteLLM layout."""
    from pipelines.demo_data import make_demo_data, parse_kinds

    try:
        counts = make_demo_data(out, notes=notes, seed=seed, kinds=parse_kinds(kinds),
                                one_modality_distractors=one_modality_distractors)
    except ValueError as e:
        _fail(str(e))
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _run_local(data: str, work: str, preset: str, overrides: tuple[str, ...]) -> None:
    from pipelines.local import PipelineFailed, run_local, summary_table

    t0 = time.perf_counter()
    try:
        res = run_local(data, work, preset=preset, overrides=overrides)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    except PipelineFailed as e:
        _fail(f"{e}\nThe failing task's log above says why. Nothing was registered.")
    click.echo("")
    click.secho(f"pipeline finished in {time.perf_counter() - t0:.0f} s", fg="green", bold=True)
    click.echo(summary_table(res.metrics))
    click.echo(f"\nresults in {res.work}: metrics.json, report.md, model/, embeddings/, index/, "
               "decision/ (decision.md, ab_plan.md)")
    d = res.decision
    click.echo(f"registered model: {res.model_uri} (alias challenger)")
    click.echo(f"promotion gate:   {d['decision']} — " + "; ".join(d["reasons"]))
    if d["decision"] == "promote":
        click.echo(f"                  models:/{d['name']}@champion is now version {d['version']}")
    if res.tracking_uri.startswith("sqlite:///"):
        click.echo(f"MLflow UI:        mlflow ui --backend-store-uri {res.tracking_uri}")
    else:
        click.echo(f"MLflow:           {res.tracking_uri}")


@main.command("run-local")
@click.option("--data", required=True, help="Data folder (official NoteLLM CSV or canonical "
              "Parquet layout; local path or gs://).")
@click.option("--work", required=True, type=click.Path(file_okay=False),
              help="Work folder for results and the MLflow store.")
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(list(PRESETS)))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config override, repeatable, e.g. --set train.max_steps=50.")
def run_local_cmd(data: str, work: str, preset: str, overrides: tuple[str, ...]) -> None:
    """Run the whole KFP pipeline on this machine with kfp.local."""
    _run_local(data, work, preset, overrides)


@main.command("demo")
@click.option("--work", default="work/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--notes", default=1200, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def demo_cmd(work: str, notes: int, seed: int, overrides: tuple[str, ...]) -> None:
    """Generate the demo data set and run the pipeline on it with the tiny preset."""
    from pipelines.demo_data import make_demo_data

    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "notes_train.csv")):
        click.echo(f"generating demo data in {data} …")
        make_demo_data(data, notes=notes, seed=seed)
    _run_local(data, work, "tiny", overrides)


@main.command("compile")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="YAML file to write.")
@click.option("--image", default=None, help="Component image (default: from the package "
              "version, or $NOTELLM2_IMAGE).")
@click.option("--kubernetes/--no-kubernetes", default=False, show_default=True,
              help="Add the kfp-kubernetes settings (MLflow/GCS Secrets, the notellm2-settings "
              "ConfigMap with the MLflow URI, the node_selector and tolerations parameters, "
              "in-memory /dev/shm for the train and embed pods, image pull policy, task "
              "deadlines) as the YAML's second document: what a cluster wants, and what "
              "`submit` uploads. Without it the file is one KFP IR document.")
@click.option("--preset", default=None, help="Preset the compiled pipeline defaults to and sizes "
              "its train/embed CPU and memory parameters and deadlines for (default: tiny).")
@click.option("--embed-parallelism", type=int, default=None,
              help="At most this many embed shard pods at once (default: 8).")
@click.option("--pipeline", "which", default="train", show_default=True,
              type=click.Choice(["train", "refresh"]),
              help="train: the training pipeline; refresh: the index refresh for new notes.")
def compile_cmd(output: str, image: str | None, kubernetes: bool, preset: str | None,
                embed_parallelism: int | None, which: str) -> None:
    """Compile the pipeline to KFP IR YAML for the Kubeflow Pipelines UI or kfp.Client."""
    from pipelines.compile import compile_pipeline

    try:
        compile_pipeline(output, image=image, kubernetes=kubernetes, preset=preset,
                         embed_parallelism=embed_parallelism, pipeline=which)
    except ValueError as e:
        _fail(str(e))
    click.echo(f"wrote {output}")


@main.command("image")
def image_cmd() -> None:
    """Print the component image the pipeline compiles to (tag: package version and a hash of
    the source): build and push the image under this name."""
    from components.common.image import component_image

    click.echo(component_image())


def _registry(tracking_uri: str | None, work: str | None):
    import mlflow

    if work:
        tracking_uri = f"sqlite:///{os.path.abspath(os.path.join(work, 'mlflow.db'))}"
    if not tracking_uri:
        _fail("no MLflow registry: pass --tracking-uri (or set MLFLOW_TRACKING_URI) or --work")
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _register_cfg(overrides: tuple[str, ...]):
    from components.common.config import resolve

    try:
        return resolve("tiny", list(overrides)).register
    except ConfigError as e:
        _fail(str(e))


_REGISTRY_OPTIONS = [
    click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                 help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)."),
    click.option("--work", default=None, type=click.Path(file_okay=False),
                 help="Use the SQLite registry of a run-local work folder instead."),
    click.option("--set", "overrides", multiple=True, metavar="register.KEY=VALUE",
                 help="Override register settings (model name, gate thresholds)."),
]


def _with_registry(fn):
    for option in reversed(_REGISTRY_OPTIONS):
        fn = option(fn)
    return fn


@main.command("promote")
@click.option("--version", "version", required=True, help="Model version to make champion.")
@click.option("--force", is_flag=True, help="Promote even when the gate's checks fail.")
@_with_registry
def promote_cmd(version: str, force: bool, tracking_uri, work, overrides) -> None:
    """Make a registered version the champion, after the same checks as the pipeline's gate."""
    from mlflow.exceptions import MlflowException

    from components.register.promote import manual_promote

    client, cfg = _registry(tracking_uri, work), _register_cfg(overrides)
    try:
        moved, problems = manual_promote(client, cfg.model_name, version, cfg, force=force)
    except (PermissionError, MlflowException) as e:
        _fail(str(e))
    for p in problems:
        click.secho(f"forced past: {p}", fg="yellow")
    click.echo(f"{cfg.model_name}@champion = version {moved['champion']} (previous: "
               f"{moved['previous_champion'] or 'none'})")


@main.command("rollback")
@_with_registry
def rollback_cmd(tracking_uri, work, overrides) -> None:
    """Give the champion alias back to the previous champion."""
    from components.register.promote import rollback

    client, cfg = _registry(tracking_uri, work), _register_cfg(overrides)
    try:
        moved = rollback(client, cfg.model_name)
    except LookupError as e:
        _fail(str(e))
    click.echo(f"{cfg.model_name}@champion = version {moved['champion']} (version "
               f"{moved['demoted']} demoted)")


@main.command("compare")
@click.option("--a", "model_a", required=True, help="Model A (the candidate): models:/NAME@ALIAS, "
              "models:/NAME/VERSION or a saved model folder.")
@click.option("--b", "model_b", required=True, help="Model B (the reference), same forms.")
@click.option("--data", required=True, help="Data folder (official or canonical layout) whose "
              "test pairs are evaluated.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for metrics.json and report.md (default: a temporary one).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow URI for models:/ references (default: $MLFLOW_TRACKING_URI).")
def compare_cmd(model_a: str, model_b: str, data: str, out: str | None,
                tracking_uri: str | None) -> None:
    """R@K of A and B on the same test queries, with paired-bootstrap intervals of A − B."""
    from pipelines.compare import compare_models

    try:
        rows = compare_models(model_a, model_b, data, out, tracking_uri=tracking_uri)
    except (DataError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(rows)


def _add_submit() -> None:
    from pipelines.submit import submit_cmd

    main.add_command(submit_cmd)


_add_submit()


def _add_rollout() -> None:
    from pipelines.rollout import rollout_cmd

    main.add_command(rollout_cmd)


_add_rollout()


def _add_refresh() -> None:
    from pipelines.refresh_cli import refresh_cmd

    main.add_command(refresh_cmd)


_add_refresh()

if __name__ == "__main__":
    main()
