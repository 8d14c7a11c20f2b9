"""``notellm2 refresh``: the index refresh pipeline on this machine (kept out of cli.py, which
only registers it)."""

from __future__ import annotations

import time

import click

from components.common.config import PRESETS, ConfigError
from components.common.schema import DataError


@click.command("refresh")
@click.option("--data", required=True, help="Folder with the new notes (notes_<split>.csv in the "
              "official layout with images/ or images_<split>/, or notes_<split>.parquet; local "
              "path or gs://). Notes already in the index are skipped.")
@click.option("--work", required=True, type=click.Path(file_okay=False),
              help="Work folder of an earlier run-local: its mlflow.db is the registry (unless "
              "MLFLOW_TRACKING_URI is set).")
@click.option("--alias", default="champion", show_default=True,
              help="Registry alias of the version whose index is refreshed.")
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(list(PRESETS)))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config override, repeatable (data limits, embed.batch_size, "
              "register.model_name).")
def refresh_cmd(data: str, work: str, alias: str, preset: str,
                overrides: tuple[str, ...]) -> None:
    """Add new notes to the champion's FAISS index, embedded with the champion (no retraining)."""
    from pipelines.cli import _fail
    from pipelines.local import PipelineFailed
    from pipelines.refresh import run_refresh_local

    t0 = time.perf_counter()
    try:
        res = run_refresh_local(data, work, preset=preset, overrides=overrides, alias=alias)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    except PipelineFailed as e:
        _fail(f"{e}\nThe failing task's log above says why. Nothing was published.")
    r = res.record
    click.echo("")
    click.secho(f"refresh finished in {time.perf_counter() - t0:.0f} s", fg="green", bold=True)
    click.echo(f"model:     models:/{r['model_name']}/{r['model_version']} (@{r['alias']})")
    click.echo(f"notes:     {r['notes_given']} given, {r['skipped_existing']} already indexed, "
               f"{r['added']} added")
    if r["status"] == "published":
        click.echo(f"index:     {r['index_uri']} ({r['ntotal_after']} vectors; was "
                   f"{r['base_index_uri']}, {r['ntotal_before']})")
        click.echo(f"           tag index_uri of version {r['model_version']} now points at it; "
                   f"a copy is in {res.work}/refresh/")
    else:
        click.echo(f"index:     unchanged, {r['index_uri']}")
