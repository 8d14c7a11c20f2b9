"""The NoteLLM-2 training pipeline (KFP v2).

ingest → mine_pairs → validate ──gate──→ train → embed (shards) → merge → index → evaluate →
register
(alias ``challenger``)

mine_pairs replaces the training pairs with pairs mined from the events when the data has events
(and passes the data through otherwise). A failing validation fails its task, so nothing
downstream runs and nothing is registered; the later steps read validate's output, the data
without the notes it dropped.
"""

import os

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

from components.common.image import component_image
from components.common.tracking import KFP_UI_ENV
from components.embed.component import embed, merge_embeddings, shard_plan
from components.evaluate.component import evaluate
from components.index.component import index
from components.ingest.component import finish_run, ingest
from components.mine_pairs.component import mine_pairs
from components.register.component import promote, register
from components.train.component import train
from components.validate.component import validate

PIPELINE_NAME = "notellm2"
# Kubernetes Secrets the pods read when they exist (all optional: GKE Workload Identity or an
# in-cluster MLflow without auth need none). manifests/ creates them; see manifests/README.md.
MLFLOW_SECRET = "notellm2-mlflow"  # keys: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
GCS_SECRET = "notellm2-gcs"  # key: key.json, a service-account key for gs:// data and artifacts
GCS_KEY_DIR = "/var/secrets/gcs"


def _gpus(task: PipelineTask, accelerator_type, gpus) -> PipelineTask:
    return task.set_accelerator_type(accelerator_type).set_accelerator_limit(gpus)


def _platform(task: PipelineTask, *, node_selector=None, tolerations=None,
              shm_size: str = "", mlflow: bool = True, gcs: bool = True) -> PipelineTask:
    """kfp-kubernetes settings: the MLflow and GCS credentials to the tasks that use them
    (``mlflow``/``gcs`` False: a task that never talks to that service gets no credentials);
    placement and an in-memory /dev/shm where asked."""
    if mlflow:
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}, optional=True)
    if gcs:
        kubernetes.use_secret_as_volume(task, GCS_SECRET, GCS_KEY_DIR, optional=True)
    if node_selector is not None:
        kubernetes.add_node_selector_json(task, node_selector)
    if tolerations is not None:
        kubernetes.add_toleration_json(task, tolerations)
    if shm_size:  # NCCL and DataLoader workers need more than the container's 64 MiB default
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=shm_size)
    return task


def make_pipeline(*, resources: bool = True, kubernetes_settings: bool = False):
    """The pipeline.

    ``resources``: GPU requests of the train and embed tasks from pipeline parameters (part of
    the KFP IR). ``kubernetes_settings``: kfp-kubernetes settings (Secrets, node selector,
    tolerations, /dev/shm), written as a second YAML document, the platform spec.
    ``kfp.local`` ignores both, and cannot resolve pipeline parameters in the resource settings
    of tasks inside a ``ParallelFor``, so the local runner builds it with neither.
    """
    gpus = _gpus if resources else (lambda task, *_: task)
    place = _platform if kubernetes_settings else (lambda task, **_: task)

    @dsl.pipeline(name=PIPELINE_NAME, description=(
        "Train NoteLLM-2 multimodal note representations, embed and index the notes, evaluate "
        "R@K by the reference protocol and register the model in MLflow with alias 'challenger'."))
    def notellm2_pipeline(
        data_uri: str = "",
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006 - KFP takes the default literally; never mutated
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "notellm2",
        run_name: str = "",
        accelerator_type: str = "nvidia.com/gpu",
        train_gpus: int = 0,
        embed_gpus: int = 0,
        node_selector: dict = {},  # noqa: B006
        tolerations: list = [],  # noqa: B006
    ) -> None:
        """NoteLLM-2 end to end.

        Args:
            data_uri: Folder (local path or gs://) in the official NoteLLM CSV layout or the canonical Parquet layout.
            preset: Named configuration: tiny (CPU demo), qwen2-0.5b-clip-b16, qwen2-7b-clip-b16.
            overrides: Config overrides as "section.key=value" strings, e.g. ["train.max_steps=50"].
            mlflow_tracking_uri: MLflow tracking server; empty means the MLFLOW_TRACKING_URI environment variable.
            mlflow_experiment: MLflow experiment that receives the run.
            run_name: MLflow run name; empty lets MLflow choose.
            accelerator_type: Kubernetes resource name of the GPUs the train and embed tasks request.
            train_gpus: GPUs of the train task (one DeepSpeed process each); 0 trains on CPU.
            embed_gpus: GPUs of each embed shard task; 0 embeds on CPU.
            node_selector: (compiled with --kubernetes) Node labels the train and embed pods must match, e.g. {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}.
            tolerations: (compiled with --kubernetes) Tolerations of the train and embed pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}].
        """
        fin = finish_run(mlflow_tracking_uri=mlflow_tracking_uri,
                         mlflow_experiment=mlflow_experiment,
                         kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        fin.set_display_name("close MLflow run").set_caching_options(False)
        place(fin)
        # KFP takes no pipeline outputs from inside an ExitHandler: results are the tasks'
        # artifacts (pipelines/local.py finds them under the pipeline root)
        with dsl.ExitHandler(fin, name="tracked steps"):
            common = {"preset": preset, "overrides": overrides}
            ing = ingest(data_uri=data_uri, mlflow_tracking_uri=mlflow_tracking_uri,
                         mlflow_experiment=mlflow_experiment, run_name=run_name,
                         kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, image=component_image(),
                         **common)
            ing.set_display_name("ingest").set_caching_options(False)
            if ui := os.environ.get(KFP_UI_ENV, ""):  # the MLflow runs link to the KFP run
                ing.set_env_variable(KFP_UI_ENV, ui)
            tracked = {"mlflow_tracking_uri": mlflow_tracking_uri, "mlflow_run_id": ing.outputs["Output"]}
            mine = mine_pairs(canonical=ing.outputs["canonical"], **common, **tracked)
            mine.set_display_name("mine pairs").set_caching_options(False)
            val = validate(canonical=mine.outputs["mined"], **common, **tracked)
            val.set_display_name("validate").set_caching_options(False)
            data = val.outputs["validated"]
            tr = train(canonical=data, **common, **tracked)
            tr.set_display_name("train")
            # a TrainJob launched from this task runs the image this pipeline was compiled for
            tr.set_env_variable("NOTELLM2_IMAGE", component_image())
            gpus(tr, accelerator_type, train_gpus)
            place(tr, node_selector=node_selector, tolerations=tolerations, shm_size="16Gi")
            plan = shard_plan(**common)
            plan.set_display_name("plan embed shards")
            with dsl.ParallelFor(plan.output, name="embed-shards") as shard:
                part = embed(canonical=data, model=tr.outputs["model"], shard_index=shard, **common)
                part.set_display_name("embed shard")
                gpus(part, accelerator_type, embed_gpus)
                place(part, node_selector=node_selector, tolerations=tolerations, shm_size="4Gi",
                      mlflow=False)
            emb = merge_embeddings(shards=dsl.Collected(part.outputs["embeddings"]), **tracked)
            emb.set_display_name("merge embeddings")
            idx = index(embeddings=emb.outputs["embeddings"], **common, **tracked)
            idx.set_display_name("index")
            ev = evaluate(canonical=data, embeddings=emb.outputs["embeddings"],
                          model=tr.outputs["model"], index=idx.outputs["index"],
                          **common, **tracked)
            ev.set_display_name("evaluate")
            reg = register(model=tr.outputs["model"], evaluation=ev.outputs["evaluation"],
                           index=idx.outputs["index"], **common, **tracked)
            reg.set_display_name("register").set_caching_options(False)
            with dsl.If(reg.outputs["Output"] == "promote", name="gate passed"):
                prom = promote(decision=reg.outputs["decision"], **common, **tracked)
                prom.set_display_name("promote to champion").set_caching_options(False)
                place(prom)
            place(plan, mlflow=False, gcs=False)  # computes a shard count from the config
            for task in (ing, mine, val, emb, idx, ev, reg):
                place(task)


    return notellm2_pipeline


notellm2_pipeline = make_pipeline()
