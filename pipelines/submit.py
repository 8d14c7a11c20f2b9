"""Submit the pipeline to a Kubeflow Pipelines cluster: upload (or reuse) a pipeline version named
after the package version and the compiled YAML's content hash, then start a run or a recurring
run in an experiment.

Authentication follows kfp.Client: ``existing_token`` if given, else the token file named by
``$KF_PIPELINES_SA_TOKEN_PATH``, else the projected in-cluster service-account token at
``/var/run/secrets/kubeflow/pipelines/token`` when present, else none (a port-forwarded API).
kfp.Client skips the token file whenever a host is named, so it is passed here as credentials.
The command line takes ``existing_token`` from ``$NOTELLM2_KFP_TOKEN``, from a file
(``--token-file``, ``-`` for stdin) or, least safely, ``--token`` (the command line of a process
is readable by every user of the machine via ``ps`` and lands in shell history).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import click
import yaml

log = logging.getLogger(__name__)

# KFP IR parameter types and the Python values a run's runtime_config accepts for each
_TYPES: dict[str, tuple[str, Any]] = {
    "STRING": ("a string", lambda v: isinstance(v, str)),
    "NUMBER_INTEGER": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "NUMBER_DOUBLE": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "BOOLEAN": ("true or false", lambda v: isinstance(v, bool)),
    "LIST": ("a JSON list", lambda v: isinstance(v, list)),
    "STRUCT": ("a JSON object", lambda v: isinstance(v, dict)),
}


class SubmitError(RuntimeError):
    """The KFP API refused a request or could not be reached."""


TOKEN_ENV = "NOTELLM2_KFP_TOKEN"


def _token(ctx: click.Context, token_file, token: str | None) -> str | None:
    """The bearer token from ``--token-file``, ``$NOTELLM2_KFP_TOKEN`` or ``--token``; a token
    given on the command line works but is warned about."""
    from click.core import ParameterSource

    source = ctx.get_parameter_source("token")
    on_argv = token is not None and source == ParameterSource.COMMANDLINE
    if token_file is not None:
        if on_argv:
            raise ValueError("give the KFP token once: --token or --token-file, not both")
        token = token_file.read().strip()
        if not token:
            raise ValueError(f"--token-file {token_file.name}: the file is empty")
        return token
    if on_argv:
        click.secho(f"warning: --token puts the KFP token on the command line, where other "
                    f"users can read it (ps) and shell history keeps it; use ${TOKEN_ENV} or "
                    f"--token-file", fg="yellow", err=True)
    token = (token or "").strip()
    return token or None


# --- cron -------------------------------------------------------------------------------------

# KFP schedules with robfig/cron v1: six fields, seconds first. Its parser also takes five fields,
# read as second..month, so a Unix crontab line would silently run at the wrong times: refuse it.
_CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23),
                ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 6))
_NAMES = {
    "month": {m: i + 1 for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul",
                                              "aug", "sep", "oct", "nov", "dec"])},
    "day-of-week": {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^(\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)"
                          r"((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))*$")
_CRON_HELP = ("KFP cron expressions have 6 fields: second minute hour day-of-month month "
              "day-of-week (e.g. '0 0 2 * * *' for 02:00 every day), or a descriptor such as "
              "'@daily' or '@every 6h'")


def validate_cron(expr: str) -> str:
    """Return ``expr`` stripped if KFP's scheduler accepts it; raise ValueError saying why not."""
    spec = " ".join(expr.split())
    if not spec:
        raise ValueError(f"empty cron expression. {_CRON_HELP}")
    if spec.startswith("@"):
        if spec.lower() in _DESCRIPTORS:
            return spec
        if spec.lower().startswith("@every "):
            if _GO_DURATION.match(spec[len("@every "):].strip()):
                return spec
            raise ValueError(f"bad cron {expr!r}: '@every' takes a Go duration such as 1h30m")
        raise ValueError(f"bad cron {expr!r}: unknown descriptor. {_CRON_HELP}")
    fields = spec.split(" ")
    if len(fields) == 5:
        raise ValueError(f"bad cron {expr!r}: 5 fields look like a Unix crontab line, which KFP "
                         f"would read with seconds first. {_CRON_HELP}; for this schedule write "
                         f"'0 {spec}'")
    if len(fields) != 6:
        raise ValueError(f"bad cron {expr!r}: {len(fields)} fields. {_CRON_HELP}")
    for text, (name, lo, hi) in zip(fields, _CRON_FIELDS, strict=True):
        for part in text.split(","):
            _check_cron_range(expr, part, name, lo, hi)
    return spec


def _check_cron_range(expr: str, part: str, name: str, lo: int, hi: int) -> None:
    def bad(why: str) -> ValueError:
        return ValueError(f"bad cron {expr!r}: {name} field {part!r}: {why}")

    def value(tok: str) -> int:
        tok = tok.lower()
        if tok in _NAMES.get(name, {}):
            return _NAMES[name][tok]
        if not tok.isdigit():
            raise bad(f"{tok!r} is not a number" + (" or name" if name in _NAMES else ""))
        v = int(tok)
        if not lo <= v <= hi:
            raise bad(f"{v} outside {lo}-{hi}")
        return v

    rng, _, step = part.partition("/")
    if step and (not step.isdigit() or int(step) == 0):
        raise bad("the step after '/' must be a positive integer")
    if rng in ("*", "?"):
        return
    start, dash, end = rng.partition("-")
    first = value(start)
    if dash and value(end) < first:
        raise bad("range runs backwards")


# --- parameters -------------------------------------------------------------------------------

def parse_params(pairs: Iterable[str], types: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a parameter dict.

    Values are JSON when they parse as JSON (``2``, ``["a"]``, ``{"k": "v"}``), else the raw
    string; a repeated key collects its values in a list (a JSON list value extends it). With
    ``types`` (parameter name → KFP IR type) an unknown name is refused, a STRING parameter keeps
    the raw text and a LIST parameter always collects, taking non-list values as raw strings:
    ``--param overrides=train.max_steps=50 --param overrides=train.batch_pairs=8``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"parameter {pair!r} is not KEY=VALUE")
        if types is not None and key not in types:
            raise _unknown([key], types)
        kind = types.get(key) if types is not None else None
        value = raw if kind == "STRING" else _json_or_raw(raw)
        if kind == "LIST" or (kind is None and key in out):
            prev = out.get(key, [])
            prev = prev if isinstance(prev, list) else [prev]
            out[key] = [*prev, *(value if isinstance(value, list)
                                 else [raw if kind == "LIST" else value])]
        elif key in out:
            raise ValueError(f"parameter {key!r} given twice; only list parameters repeat")
        else:
            out[key] = value
    return out


def _json_or_raw(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _unknown(names: Iterable[str], valid: Iterable[str]) -> ValueError:
    names = sorted(names)
    return ValueError(f"unknown pipeline parameter{'s' if len(names) > 1 else ''} "
                      f"{', '.join(names)}; the pipeline takes: {', '.join(sorted(valid))}")


def pipeline_parameters(package: str) -> dict[str, dict]:
    """The compiled pipeline's input parameters (name → IR spec with ``parameterType``)."""
    with open(package) as f:
        spec = next(yaml.safe_load_all(f))
    return dict(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def check_params(params: Mapping[str, Any], spec: Mapping[str, dict]) -> None:
    """Raise ValueError for a parameter the pipeline does not have, a required one (no default)
    that is missing, or a value of the wrong type."""
    unknown = set(params) - set(spec)
    if unknown:
        raise _unknown(unknown, spec)
    missing = sorted(k for k, v in spec.items()
                     if "defaultValue" not in v and not v.get("isOptional") and k not in params)
    if missing:
        raise ValueError(f"missing required pipeline parameter{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} (--param {missing[0]}=...)")
    for name, value in params.items():
        kind = spec[name]["parameterType"]
        what, ok = _TYPES.get(kind, (kind, lambda v: True))
        if not ok(value):
            raise ValueError(f"parameter {name} takes {what} ({kind}), got {value!r}")


# --- KFP --------------------------------------------------------------------------------------

def _client(host: str, namespace: str | None, existing_token: str | None):
    import kfp
    from kfp.client import (
        KF_PIPELINES_SA_TOKEN_ENV,
        KF_PIPELINES_SA_TOKEN_PATH,
        ServiceAccountTokenVolumeCredentials,
    )

    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if existing_token:
        kwargs["existing_token"] = existing_token
    else:
        path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV)
        if path and not os.path.isfile(path):
            raise ValueError(f"${KF_PIPELINES_SA_TOKEN_ENV} names {path}, which does not exist")
        path = path or (KF_PIPELINES_SA_TOKEN_PATH
                        if os.path.isfile(KF_PIPELINES_SA_TOKEN_PATH) else None)
        if path:
            kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
        return kfp.Client(**kwargs)


def _name_filter(name: str) -> str:
    # operation 1 is EQUALS in filter.proto; kfp.Client's own name look-ups send the number
    return json.dumps({"predicates": [{"operation": 1, "key": "display_name",
                                       "stringValue": name}]})


def _find_pipeline(client, name: str, namespace: str | None) -> str | None:
    res = client.list_pipelines(filter=_name_filter(name), namespace=namespace, page_size=10)
    hits = [p for p in res.pipelines or [] if name in (p.display_name, p.name)]
    if len(hits) > 1:
        raise SubmitError(f"{len(hits)} pipelines are named {name!r}; KFP needs the name unique")
    return hits[0].pipeline_id if hits else None


def _find_version(client, pipeline_id: str, name: str) -> str | None:
    res = client.list_pipeline_versions(pipeline_id, filter=_name_filter(name), page_size=10)
    hits = [v for v in res.pipeline_versions or [] if name in (v.display_name, v.name)]
    return hits[0].pipeline_version_id if hits else None


def _api_error(e: Exception, host: str) -> SubmitError:
    import kfp_server_api

    if isinstance(e, kfp_server_api.ApiException):
        detail = e.body.decode(errors="replace") if isinstance(e.body, bytes) else (e.body or "")
        try:
            body = json.loads(detail)
            detail = body.get("error_message") or body.get("message") or detail
        except (ValueError, AttributeError):
            pass
        hint = (" (check --token-file, $NOTELLM2_KFP_TOKEN or --token, or "
                "$KF_PIPELINES_SA_TOKEN_PATH)" if e.status in (401, 403) else "")
        return SubmitError(f"KFP API at {host} answered {e.status} {e.reason}: "
                           f"{str(detail).strip()}{hint}")
    return SubmitError(f"could not talk to the KFP API at {host}: {e}")


def submit(host: str, *, namespace: str | None = None, experiment: str | None = None,
           params: dict, run_name: str | None = None, recurring_cron: str | None = None,
           pipeline_name: str | None = None, image: str | None = None, kubernetes: bool = True,
           existing_token: str | None = None, pipeline: str = "train") -> dict:
    """Compile, upload or reuse the pipeline version, and start a run (or a recurring run).
    ``pipeline``: ``train`` (uploaded as ``notellm2``) or ``refresh`` (the index refresh,
    uploaded as ``notellm2-refresh``), unless ``pipeline_name`` says otherwise.

    Returns ids, whether anything was uploaded, and ``url``, the run's page in the KFP UI.
    Raises ValueError for a bad cron or parameter (before contacting the cluster) and
    :class:`SubmitError` when the API refuses a request."""
    import kfp_server_api
    import urllib3

    from components.common.image import package_version
    from pipelines.compile import compile_pipeline

    cron = validate_cron(recurring_cron) if recurring_cron is not None else None
    pipeline_name = pipeline_name or {"refresh": "notellm2-refresh"}.get(pipeline, "notellm2")
    host = host.rstrip("/")
    experiment = (experiment or os.environ.get("KF_PIPELINES_DEFAULT_EXPERIMENT_NAME")
                  or "Default")
    run_name = run_name or f"{pipeline_name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(os.path.join(tmp, "pipeline.yaml"), image=image,
                                   kubernetes=kubernetes, pipeline=pipeline)
        check_params(params, pipeline_parameters(package))
        with open(package, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        # same YAML, same name: resubmitting an unchanged pipeline reuses its version
        version_name = f"{package_version()}-{digest[:12]}"
        out: dict[str, Any] = {"pipeline_version_name": version_name, "uploaded": None}
        # kfp.Client prints links of its own; the caller prints ours
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                client = _client(host, namespace, existing_token)
                pipeline_id = _find_pipeline(client, pipeline_name, namespace)
                version_id = None
                if pipeline_id is None:
                    pipeline_id = client.upload_pipeline(
                        package, pipeline_name=pipeline_name, namespace=namespace,
                        description=_description(package)).pipeline_id
                    out["uploaded"] = "pipeline"
                    log.info("uploaded pipeline %s (%s)", pipeline_name, pipeline_id)
                else:
                    version_id = _find_version(client, pipeline_id, version_name)
                if version_id is None:
                    # a new pipeline's first version carries the pipeline's name; the named
                    # version is what later submissions of the same YAML find and reuse
                    version_id = client.upload_pipeline_version(
                        package, version_name, pipeline_id=pipeline_id).pipeline_version_id
                    out["uploaded"] = out["uploaded"] or "version"
                    log.info("uploaded pipeline version %s (%s)", version_name, version_id)
                else:
                    log.info("reusing pipeline version %s (%s)", version_name, version_id)
                experiment_id = client.create_experiment(
                    experiment, namespace=namespace).experiment_id
                if cron is None:
                    run = client.run_pipeline(experiment_id, run_name, params=params,
                                              pipeline_id=pipeline_id, version_id=version_id)
                    out.update(run_id=run.run_id, url=f"{host}/#/runs/details/{run.run_id}")
                else:
                    rec = client.create_recurring_run(
                        experiment_id, run_name, cron_expression=cron, params=params,
                        pipeline_id=pipeline_id, version_id=version_id, no_catchup=True)
                    out.update(recurring_run_id=rec.recurring_run_id,
                               url=f"{host}/#/recurringrun/details/{rec.recurring_run_id}")
        except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, TimeoutError) as e:
            raise _api_error(e, host) from None
    out.update(pipeline_id=pipeline_id, pipeline_version_id=version_id,
               experiment_id=experiment_id)
    return out


def _description(package: str) -> str | None:
    with open(package) as f:
        return next(yaml.safe_load_all(f)).get("pipelineInfo", {}).get("description")


@click.command("submit")
@click.option("--host", required=True, envvar="KF_PIPELINES_ENDPOINT", show_envvar=True,
              help="KFP API endpoint, e.g. http://localhost:8080 (port-forwarded ml-pipeline-ui).")
@click.option("--namespace", default=None, help="Kubernetes namespace (multi-user KFP).")
@click.option("--experiment", default=None, help="KFP experiment, created if missing "
              "[default: $KF_PIPELINES_DEFAULT_EXPERIMENT_NAME or Default].")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Pipeline parameter, repeatable; JSON values parse "
              "(--param train_gpus=8 --param overrides=train.max_steps=50, overrides repeats).")
@click.option("--run-name", default=None, help="KFP run name [default: pipeline name and time].")
@click.option("--pipeline", "which", default="train", show_default=True,
              type=click.Choice(["train", "refresh"]),
              help="train: the training pipeline (uploaded as notellm2); refresh: the index "
              "refresh for new notes (uploaded as notellm2-refresh).")
@click.option("--recurring", "cron", default=None, metavar="CRON",
              help="Create a recurring run on this 6-field KFP cron "
              "(second minute hour day-of-month month day-of-week), e.g. '0 0 2 * * *'.")
@click.option("--image", default=None, help="Component image (default: from the package version, "
              "or $NOTELLM2_IMAGE).")
@click.option("--token-file", type=click.File("r"), default=None, metavar="PATH",
              help="Read the bearer token for the KFP API from this file ('-': stdin).")
@click.option("--token", default=None, envvar=TOKEN_ENV, show_envvar=True,
              help="Bearer token for the KFP API. Prefer the environment variable or "
              "--token-file: a token on the command line is visible to other users (ps) and "
              "stays in shell history [default: the file named by $KF_PIPELINES_SA_TOKEN_PATH, "
              "or the in-cluster pipelines token].")
def submit_cmd(host: str, namespace: str | None, experiment: str | None,
               param_pairs: tuple[str, ...], run_name: str | None, cron: str | None,
               image: str | None, token_file, token: str | None, which: str = "train") -> None:
    """Upload the pipeline (reusing an identical version) and start a run on a KFP cluster.

    The KFP bearer token comes from --token-file, $NOTELLM2_KFP_TOKEN or --token (in that
    order of preference), else from kfp's own sources ($KF_PIPELINES_SA_TOKEN_PATH, the
    in-cluster pipelines token)."""
    from pipelines.cli import _fail
    from pipelines.compile import compile_pipeline

    try:
        token = _token(click.get_current_context(), token_file, token)
        if cron is not None:
            validate_cron(cron)
        with tempfile.TemporaryDirectory() as tmp:
            spec = pipeline_parameters(compile_pipeline(os.path.join(tmp, "p.yaml"),
                                                        image=image, kubernetes=True,
                                                        pipeline=which))
        params = parse_params(param_pairs, {k: v["parameterType"] for k, v in spec.items()})
        res = submit(host, namespace=namespace, experiment=experiment, params=params,
                     run_name=run_name, recurring_cron=cron, image=image,
                     existing_token=token, pipeline=which)
    except (ValueError, SubmitError) as e:
        _fail(str(e))
    what = {"pipeline": "uploaded new pipeline", "version": "uploaded new version"}.get(
        res["uploaded"], "reused version")
    click.echo(f"pipeline version: {res['pipeline_version_name']} ({what})")
    kind = "recurring run" if cron else "run"
    click.secho(f"{kind}: {res['url']}", fg="green")
