"""The index refresh pipeline (KFP v2): notes published since the last run go into the champion's
FAISS index, embedded with the champion, without retraining. Meant as a recurring run.

ingest (opens the refresh's MLflow run) → validate new notes (notes and images suites) →
refresh index (embed the notes the index lacks with ``models:/notellm2@champion``, add them to a
copy of its index, log it as this run's ``index`` artifact, point the version's ``index_uri``
tag at it). See :mod:`components.refresh.run` for the rules; ``run_refresh_local`` runs it
with ``kfp.local`` as ``notellm2 refresh`` does.
"""

import json
import os
import shutil
import warnings
from dataclasses import dataclass

from kfp import dsl

from components.common.image import component_image
from components.ingest.component import finish_run, ingest
from components.refresh.component import refresh_index, validate_new_notes

PIPELINE_NAME = "notellm2-refresh"


def make_refresh_pipeline(*, resources: bool = True, kubernetes_settings: bool = False):
    """The refresh pipeline; ``resources`` and ``kubernetes_settings`` as in
    :func:`pipelines.pipeline.make_pipeline` (the local runner builds it with neither)."""
    from pipelines.pipeline import _platform

    def gpus(task, accelerator_type, count):
        if resources:
            task.set_accelerator_type(accelerator_type).set_accelerator_limit(count)
        return task

    place = _platform if kubernetes_settings else (lambda task, **_: task)

    @dsl.pipeline(name=PIPELINE_NAME, description=(
        "Add notes published since the last run to the NoteLLM-2 champion's FAISS index, "
        "embedded with the champion (no retraining); the refreshed index is logged to this "
        "run and named by the version's index_uri tag."))
    def notellm2_refresh(
        data_uri: str,
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006 - KFP takes the default literally; never mutated
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "notellm2",
        run_name: str = "",
        model_alias: str = "champion",
        accelerator_type: str = "nvidia.com/gpu",
        embed_gpus: int = 0,
        node_selector: dict = {},  # noqa: B006
        tolerations: list = [],  # noqa: B006
    ) -> None:
        """Index refresh for new notes.

        Args:
            data_uri: Folder (local path or gs://) with the new notes: notes_<split>.csv (official layout, images in images/ or images_<split>/) or notes_<split>.parquet; notes already in the index are skipped.
            preset: Named configuration (data limits, embed batch size, register.model_name).
            overrides: Config overrides as "section.key=value" strings.
            mlflow_tracking_uri: MLflow tracking server; empty means the MLFLOW_TRACKING_URI environment variable.
            mlflow_experiment: MLflow experiment that receives the refresh run.
            run_name: MLflow run name; empty lets MLflow choose.
            model_alias: Registry alias of the version whose index is refreshed.
            accelerator_type: Kubernetes resource name of the GPUs the refresh task requests.
            embed_gpus: GPUs of the refresh task (it embeds the new notes); 0 embeds on CPU.
            node_selector: (compiled with --kubernetes) Node labels the refresh pod must match.
            tolerations: (compiled with --kubernetes) Tolerations of the refresh pod.
        """
        fin = finish_run(mlflow_tracking_uri=mlflow_tracking_uri,
                         mlflow_experiment=mlflow_experiment,
                         kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        fin.set_display_name("close MLflow run").set_caching_options(False)
        place(fin)
        with dsl.ExitHandler(fin, name="tracked steps"):
            common = {"preset": preset, "overrides": overrides}
            ing = ingest(data_uri=data_uri, mlflow_tracking_uri=mlflow_tracking_uri,
                         mlflow_experiment=mlflow_experiment, run_name=run_name,
                         kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                         image=component_image(), **common)
            ing.set_display_name("ingest new notes")
            tracked = {"mlflow_tracking_uri": mlflow_tracking_uri,
                       "mlflow_run_id": ing.outputs["Output"]}
            val = validate_new_notes(canonical=ing.outputs["canonical"], **common, **tracked)
            val.set_display_name("validate new notes")
            ref = refresh_index(canonical=val.outputs["validated"], model_alias=model_alias,
                                **common, **tracked)
            ref.set_display_name("refresh index")
            gpus(ref, accelerator_type, embed_gpus)
            place(ref, node_selector=node_selector, tolerations=tolerations, shm_size="4Gi")
            for task in (ing, val, ref):
                # every run reads the registry's state of the moment: a cached result would
                # skip notes the index still lacks
                task.set_caching_options(False)
            for task in (ing, val):
                place(task)

    return notellm2_refresh


# -- running it on this machine ----------------------------------------------------------------

@dataclass
class RefreshResult:
    work: str
    record: dict
    tracking_uri: str


def run_refresh_local(data: str, work: str, *, preset: str = "tiny",
                      overrides: tuple[str, ...] = (), experiment: str = "notellm2",
                      alias: str = "champion", run_name: str = "") -> RefreshResult:
    """Run the refresh pipeline with ``kfp.local`` against the registry of the work folder of an
    earlier ``run-local`` (or ``$MLFLOW_TRACKING_URI``). Leaves ``WORK/refresh/refresh.json``
    and, when the index grew, ``WORK/refresh/index/``; raises :class:`PipelineFailed`."""
    from components.common import storage
    from components.common.config import resolve
    from components.common.readers import read_dataset
    from pipelines.local import PipelineFailed, _plain, _prepare_store, _Tee, default_tracking

    cfg = resolve(preset, list(overrides))
    data = data if storage.is_gcs(data) else os.path.abspath(data)
    read_dataset(data, cfg.data)  # a file that does not parse is refused before any task
    work = os.path.abspath(work)
    uri, own_store = default_tracking(work)
    if own_store:
        if not os.path.exists(os.path.join(work, "mlflow.db")):
            raise PipelineFailed(f"{work} holds no mlflow.db: run `notellm2 run-local --work "
                                 f"{work}` first (or set MLFLOW_TRACKING_URI)")
        _prepare_store(uri, work, experiment)
    out_dir = os.path.join(work, "refresh")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)

    from kfp import local

    root = os.path.join(work, "pipeline_root")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root,
               raise_on_error=True)
    before = set(os.listdir(root)) if os.path.isdir(root) else set()
    pipeline = make_refresh_pipeline(resources=False)
    with warnings.catch_warnings(), _Tee() as tee:
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        try:
            pipeline(data_uri=data, preset=preset, overrides=list(overrides),
                     mlflow_tracking_uri=uri, mlflow_experiment=experiment, run_name=run_name,
                     model_alias=alias)
        except RuntimeError as e:
            cause = tee.last_exception()
            raise PipelineFailed(_plain(str(e)) + (f"\n{cause}" if cause else "")) from None
    new = sorted(set(os.listdir(root)) - before)
    if len(new) != 1:
        raise PipelineFailed(f"expected one new run folder under {root}, found {new}")
    produced = os.path.join(root, new[0], "refresh-index", "index")
    if not os.path.exists(os.path.join(produced, "refresh.json")):
        raise PipelineFailed(f"the refresh finished but left no {produced}/refresh.json")
    shutil.copytree(produced, out_dir)
    with open(os.path.join(out_dir, "refresh.json")) as f:
        record = json.load(f)
    return RefreshResult(work=work, record=record, tracking_uri=uri)
