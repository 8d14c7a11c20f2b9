"""Run the pipeline on this machine with ``kfp.local`` and lay the results out in a work folder.

WORK/
  metrics.json  report.md  report.html  *.png   evaluation (report.html: charts embedded)
  model/        the trained model (save_pretrained format)
  embeddings/   notes.parquet (note_id, split, vector), vectors.npy, probe_*.parquet
  index/        index.faiss, ids.parquet, index.json
  mlflow.db     the MLflow store, unless MLFLOW_TRACKING_URI is set
  pipeline_root/ every task's raw outputs, as kfp.local leaves them
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass

from components.common import storage
from components.common.canonical import evaluation_errors
from components.common.config import resolve
from components.common.readers import read_dataset
from components.common.schema import DataError
from components.common.tracking import ENV as TRACKING_ENV

log = logging.getLogger(__name__)
CHARTS = ("recall_at_k.png", "probes_slices.png", "fusion_similarity.png")
RESULTS = ("metrics.json", "report.md", "report.html", *CHARTS, "decision", "model", "embeddings", "index")


class PipelineFailed(RuntimeError):
    pass


@dataclass
class LocalResult:
    work: str
    metrics: dict
    model_uri: str
    tracking_uri: str
    decision: dict


def default_tracking(work: str) -> tuple[str, bool]:
    """(tracking URI, whether it is the work folder's own SQLite store)."""
    uri = os.environ.get(TRACKING_ENV, "")
    if uri:
        return uri, False
    return f"sqlite:///{os.path.join(work, 'mlflow.db')}", True


def _prepare_store(uri: str, work: str, experiment: str) -> None:
    """Create the experiment with its artifacts inside the work folder (not ./mlruns)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=
                                 "file://" + os.path.join(work, "mlartifacts"))


def preflight(data: str, cfg) -> None:
    """Read the data folder here, as ``ingest`` will, before any task starts: a file that does
    not parse (encoding, quotes, field counts, limits, paths) is refused in a second, with file,
    row and field, instead of after the pipeline has spun up. The checks that need the whole
    data set (the validation suites, images, leaks after pair mining) stay in the pipeline."""
    ds = read_dataset(data, cfg.data)
    if problems := evaluation_errors(ds.notes, {}):  # pairs: mining may still replace them
        raise DataError(f"{data}: " + "; ".join(problems))


def run_local(data: str, work: str, *, preset: str = "tiny", overrides: tuple[str, ...] = (),
              experiment: str = "notellm2", run_name: str = "") -> LocalResult:
    """Run the whole pipeline; raise :class:`PipelineFailed` naming the task that failed."""
    cfg = resolve(preset, list(overrides))  # fail on a bad key before anything starts
    data = data if storage.is_gcs(data) else os.path.abspath(data)
    preflight(data, cfg)
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    for name in RESULTS:  # results of an earlier run must not pass for this run's
        path = os.path.join(work, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    uri, own_store = default_tracking(work)
    if own_store:
        _prepare_store(uri, work, experiment)

    from kfp import local

    from pipelines.pipeline import make_pipeline

    notellm2_pipeline = make_pipeline(resources=False, kubernetes_settings=False)

    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=os.path.join(work, "pipeline_root"), raise_on_error=True)
    root = os.path.join(work, "pipeline_root")
    before = set(os.listdir(root)) if os.path.isdir(root) else set()
    with warnings.catch_warnings(), _Tee() as tee:
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        try:
            notellm2_pipeline(data_uri=data, preset=preset, overrides=list(overrides),
                              mlflow_tracking_uri=uri, mlflow_experiment=experiment,
                              run_name=run_name)
        except RuntimeError as e:
            cause = tee.last_exception()
            raise PipelineFailed(_plain(str(e)) + (f"\n{cause}" if cause else "")) from None
    out = _outputs(root, before)
    _publish(out, work)
    with open(os.path.join(work, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(out["decision"], "decision.json")) as f:
        decision = json.load(f)
    return LocalResult(work=work, metrics=metrics, tracking_uri=uri, decision=decision,
                       model_uri=f"models:/{decision['name']}/{decision['version']}")


class _Tee(io.TextIOBase):
    """Pass stdout through while keeping the tail, to quote a failing task's exception."""

    def __init__(self, keep: int = 400):
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._buf = ""

    def __enter__(self):
        self._out, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc):
        sys.stdout = self._out

    def write(self, text: str) -> int:
        self._out.write(text)
        self._buf += text
        *done, self._buf = self._buf.split("\n")
        self.lines.extend(done)
        return len(text)

    def flush(self) -> None:
        self._out.flush()

    def last_exception(self) -> str:
        """The final ``pkg.Error: message`` line of the last traceback, with its continuation."""
        lines = [_plain(x).strip() for x in self.lines]
        exc = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Failed)): ")
        for i in range(len(lines) - 1, -1, -1):
            if exc.match(lines[i]):
                tail = []
                for nxt in lines[i + 1:]:
                    if not nxt or re.match(r"^\d\d:\d\d:\d\d", nxt) or nxt.startswith("---"):
                        break
                    tail.append(nxt)
                return "\n".join([exc.sub(r"\1: ", lines[i]), *("  " + t for t in tail)])
        return ""


def _plain(msg: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", msg)


# where kfp.local leaves each result: <pipeline root>/<pipeline>-<time>/<task>/<output>
OUTPUTS = {"model": ("train", "model"), "embeddings": ("merge-embeddings", "embeddings"),
           "index": ("index", "index"), "evaluation": ("evaluate", "evaluation"),
           "decision": ("register", "decision")}


def _outputs(root: str, before: set[str]) -> dict[str, str]:
    """The result folders of the run that just finished (the pipeline returns none: KFP takes
    no pipeline outputs from inside its ExitHandler)."""
    new = sorted(set(os.listdir(root)) - before)
    if len(new) != 1:
        raise PipelineFailed(f"expected one new run folder under {root}, found {new}")
    run = os.path.join(root, new[0])
    out = {key: os.path.join(run, task, name) for key, (task, name) in OUTPUTS.items()}
    missing = [p for p in out.values() if not os.path.exists(p)]
    if missing:
        raise PipelineFailed(f"the run finished but left no {', '.join(missing)}")
    return out


def _publish(out: dict[str, str], work: str) -> None:
    """Copy the pipeline's outputs into the work-folder layout (only after every task passed)."""
    ev = out["evaluation"]
    for name in ("metrics.json", "report.md", "report.html", *CHARTS):
        if os.path.exists(os.path.join(ev, name)):
            shutil.copyfile(os.path.join(ev, name), os.path.join(work, name))
    for key in ("model", "embeddings", "index", "decision"):
        shutil.copytree(out[key], os.path.join(work, key))


def summary_table(metrics: dict) -> str:
    """R@K per set (overall, index, slices, probes, the champion's overall) as an aligned text
    table; the per-slice probes and the comparison with intervals are in report.md."""
    from components.evaluate.run import groups

    # probes per slice stay in report.md and the bar chart; here the headline sets
    g = {n: s for n, s in groups(metrics).items()
         if not (n.startswith("probe/") and "/slice/" in n) and not n.startswith(
             ("delta", "champion/"))}
    ks = sorted({k for s in g.values() for k in s})
    if not ks:
        return (f"no R@K: the candidate pool ({metrics.get('pool_size', 0)} notes) is smaller "
                "than every K")
    width = max(len(n) for n in g) + 2
    lines = ["set".ljust(width) + "".join(f"R@{k}".rjust(9) for k in ks)]
    for name, series in g.items():
        lines.append(name.ljust(width) + "".join(
            (f"{series[k]:.4f}" if k in series else "-").rjust(9) for k in ks))
    lines.append(f"queries: {metrics.get('n_queries')}, candidate pool: "
                 f"{metrics.get('pool_size')} (ties counted against the partner)")
    return "\n".join(lines)
