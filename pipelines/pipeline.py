"""The NoteLLM-2 training pipeline (KFP v2).

settings → ingest → mine_pairs → validate → validation gate → train → embed (shards) → merge →
index → evaluate → register (alias ``challenger``) → [promote]

``settings`` merges the typed parameters into the overrides every later task resolves its config
from. mine_pairs replaces the training pairs with pairs mined from the events when the data has
events (and passes the data through otherwise). validate always succeeds with a verdict and its
reports (so the Data Docs of a refused data set reach the UI); the gate after it fails the run
with validate's error, so nothing downstream runs and nothing is registered. The later steps read
validate's output, the data without the notes it dropped.

Compiled for a cluster (the default), every task carries CPU/memory requests and limits, a
deadline, its caching choice and, where a second attempt is safe, a retry policy
(``pipelines/resources.py``); kfp-kubernetes adds Secrets, the ConfigMap with the MLflow
tracking URI, placement and the image pull policy.
"""

import os

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

from components.common.image import component_image, image_pull_policy
from components.common.tracking import KFP_UI_ENV
from components.embed.component import embed, merge_embeddings, shard_plan
from components.evaluate.component import evaluate
from components.index.component import index
from components.ingest.component import finish_run, ingest
from components.mine_pairs.component import mine_pairs
from components.register.component import promote, register
from components.settings.component import settings
from components.train.component import train
from components.validate.component import validate, validate_gate
from pipelines import resources as res

PIPELINE_NAME = "notellm2"
# Kubernetes Secrets the pods read when they exist (all optional: GKE Workload Identity or an
# in-cluster MLflow without auth need none). manifests/ creates them; see manifests/README.md.
MLFLOW_SECRET = "notellm2-mlflow"  # keys: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
GCS_SECRET = "notellm2-gcs"  # key: key.json, a service-account key for gs:// data and artifacts
GCS_KEY_DIR = "/var/secrets/gcs"
# ConfigMap (optional) with the non-secret settings: MLFLOW_TRACKING_URI, used when the
# mlflow_tracking_uri parameter is empty. manifests/base/profile creates it.
SETTINGS_CONFIG_MAP = "notellm2-settings"
DEFAULT_EMBED_PARALLELISM = 8


def _platform(task: PipelineTask, *, node_selector=None, tolerations=None,
              shm_size: str = "", mlflow: bool = True, gcs: bool = True,
              timeout_s: int = 0) -> PipelineTask:
    """kfp-kubernetes settings: the MLflow and GCS credentials and the tracking URI to the tasks
    that use them (``mlflow``/``gcs`` False: a task that never talks to that service gets none);
    the image pull policy and the pod's deadline on every task; placement and an in-memory
    /dev/shm where asked."""
    if mlflow:
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}, optional=True)
        kubernetes.use_config_map_as_env(task, SETTINGS_CONFIG_MAP, {
            "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}, optional=True)
    if gcs:
        kubernetes.use_secret_as_volume(task, GCS_SECRET, GCS_KEY_DIR, optional=True)
    if node_selector is not None:
        kubernetes.add_node_selector_json(task, node_selector)
    if tolerations is not None:
        kubernetes.add_toleration_json(task, tolerations)
    if shm_size:  # NCCL and DataLoader workers need more than the container's 64 MiB default
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=shm_size)
    kubernetes.set_image_pull_policy(task, image_pull_policy())
    if timeout_s:
        kubernetes.set_timeout(task, timeout_s)
    return task


# parameters that only the kfp-kubernetes platform spec uses: a pipeline compiled without it
# does not offer them (a parameter in the run form that does nothing would mislead)
PLACEMENT = ("node_selector", "tolerations")


def _without(func, names: tuple[str, ...]):
    """``func`` as KFP sees it without the trailing parameters ``names``: KFP reads the
    signature and calls the function positionally, so the omitted ones keep their defaults."""
    import functools
    import inspect

    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    assert [p.name for p in params[-len(names):]] == list(names), "placement params must be last"

    @functools.wraps(func)
    def wrapper(*args):
        return func(*args)

    wrapper.__signature__ = sig.replace(parameters=params[:-len(names)])
    wrapper.__doc__ = "\n".join(line for line in (func.__doc__ or "").splitlines()
                                if not line.strip().startswith(tuple(f"{n}:" for n in names)))
    return wrapper


def _size(task: PipelineTask, cpu, memory) -> PipelineTask:
    return (task.set_cpu_request(cpu).set_cpu_limit(cpu)
            .set_memory_request(memory).set_memory_limit(memory))


def _retry(task: PipelineTask, step: str) -> PipelineTask:
    r = res.RETRIES[step]
    return task.set_retry(r.retries, backoff_duration=r.backoff, backoff_factor=r.factor,
                          backoff_max_duration=r.max_backoff)


def make_pipeline(*, resources: bool = True, kubernetes_settings: bool = True,
                  sizing: str = res.DEFAULT_SIZING,
                  embed_parallelism: int = DEFAULT_EMBED_PARALLELISM):
    """The pipeline.

    ``resources``: CPU, memory and GPU requests and limits (from pipeline parameters for the
    model-sized tasks, from ``pipelines/resources.py`` for the others) and the retry policies,
    part of the KFP IR. ``kubernetes_settings``: kfp-kubernetes settings (Secrets, the settings
    ConfigMap, node selector, tolerations, /dev/shm, image pull policy, deadlines), written as a
    second YAML document, the platform spec. ``kfp.local`` ignores the platform spec, cannot
    resolve pipeline parameters in the resource settings of tasks inside a ``ParallelFor``, and
    should fail at once rather than retry, so the local runner builds it with neither.
    ``sizing``: the preset whose ``SIZES`` give the defaults of the resource parameters, the
    deadlines and the default of the ``preset`` parameter. ``embed_parallelism``: at most this
    many embed shards run at once (KFP takes a constant here, not a run parameter).
    """
    size = res.sizes(sizing)
    steps = res.STEPS
    place = _platform if kubernetes_settings else (lambda task, **_: task)

    def cluster(task: PipelineTask, step: str, cpu=None, memory=None) -> PipelineTask:
        if resources:
            _size(task, cpu or steps[step].cpu, memory or steps[step].memory)
            if step in res.RETRIES:
                _retry(task, step)
        return task

    def gpus(task: PipelineTask, accelerator_type, count) -> PipelineTask:
        if resources:
            task.set_accelerator_type(accelerator_type).set_accelerator_limit(count)
        return task

    def notellm2_pipeline(
        data_uri: str,
        preset: str = sizing,
        train_steps: int = 0,
        learning_rate: float = 0.0,
        batch_pairs: int = 0,
        model_variant: str = "",
        llm: str = "",
        vision: str = "",
        overrides: list = [],  # noqa: B006 - KFP takes the default literally; never mutated
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "notellm2",
        run_name: str = "",
        accelerator_type: str = "nvidia.com/gpu",
        train_gpus: int = 0,
        embed_gpus: int = 0,
        train_cpu: str = size["train"].cpu,
        train_memory: str = size["train"].memory,
        embed_cpu: str = size["embed"].cpu,
        embed_memory: str = size["embed"].memory,
        node_selector: dict = {},  # noqa: B006
        tolerations: list = [],  # noqa: B006
    ) -> None:
        """NoteLLM-2 end to end.

        Args:
            data_uri: (required) Folder (local path or gs://) in the official NoteLLM CSV layout or the canonical Parquet layout.
            preset: Named configuration: tiny (CPU demo), qwen2-0.5b-clip-b16, qwen2-7b-clip-b16.
            train_steps: Optimizer steps (train.max_steps); 0 keeps the preset's, -1 trains by epochs.
            learning_rate: Peak learning rate (train.lr); 0 keeps the preset's.
            batch_pairs: Training pairs per process and step (train.batch_pairs); 0 keeps the preset's.
            model_variant: text_only, mllm_basic, late_fusion, micl or notellm2 (model.variant); empty keeps the preset's.
            llm: Causal LLM, a Hugging Face id or folder (model.llm); empty keeps the preset's.
            vision: CLIP or SigLIP vision tower, a Hugging Face id or folder (model.vision); empty keeps the preset's.
            overrides: Any other config overrides as "section.key=value" strings, e.g. ["train.warmup_ratio=0.05"]; a key also set by a parameter above must agree with it.
            mlflow_tracking_uri: MLflow tracking server; empty means the pods' MLFLOW_TRACKING_URI (from the notellm2-settings ConfigMap).
            mlflow_experiment: MLflow experiment that receives the run.
            run_name: MLflow run name; empty lets MLflow choose.
            accelerator_type: Kubernetes resource name of the GPUs the train and embed tasks request.
            train_gpus: GPUs of the train task (one DeepSpeed process each); 0 trains on CPU.
            embed_gpus: GPUs of each embed shard task; 0 embeds on CPU.
            train_cpu: CPU request and limit of the train task (Kubernetes quantity).
            train_memory: Memory request and limit of the train task, e.g. 64Gi.
            embed_cpu: CPU request and limit of each embed shard task and of evaluate.
            embed_memory: Memory request and limit of each embed shard task and of evaluate (it embeds the test notes with the champion).
            node_selector: Node labels the train and embed pods must match, e.g. {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}.
            tolerations: Tolerations of the train and embed pods, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}].
        """
        fin = finish_run(mlflow_tracking_uri=mlflow_tracking_uri,
                         mlflow_experiment=mlflow_experiment,
                         kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        fin.set_display_name("close MLflow run").set_caching_options(False)
        cluster(fin, "finish_run")
        place(fin, gcs=False, timeout_s=steps["finish_run"].timeout_s)
        # KFP takes no pipeline outputs from inside an ExitHandler: results are the tasks'
        # artifacts (pipelines/local.py finds them under the pipeline root)
        with dsl.ExitHandler(fin, name="tracked steps"):
            # Caching: only tasks that are pure functions of their inputs (config, data
            # artifacts) may be cached; every task that writes to MLflow or the registry, or
            # reads data a URI may have changed, is not (README, "Caching").
            conf = settings(preset=preset, overrides=overrides, train_steps=train_steps,
                            learning_rate=learning_rate, batch_pairs=batch_pairs,
                            model_variant=model_variant, llm=llm, vision=vision)
            conf.set_display_name("resolve settings").set_caching_options(True)
            cluster(conf, "settings")
            place(conf, mlflow=False, gcs=False, timeout_s=steps["settings"].timeout_s)
            common = {"preset": preset, "overrides": conf.output}
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
            gate = validate_gate(verdict=val.outputs["verdict"], errors=val.outputs["errors"])
            gate.set_display_name("validation gate").set_caching_options(False)
            cluster(gate, "validate_gate")
            place(gate, mlflow=False, gcs=False, timeout_s=steps["validate_gate"].timeout_s)
            data = val.outputs["validated"]
            tr = train(canonical=data, **common, **tracked).after(gate)
            tr.set_display_name("train").set_caching_options(False)
            # a TrainJob launched from this task runs the image this pipeline was compiled for
            tr.set_env_variable("NOTELLM2_IMAGE", component_image())
            cluster(tr, "train", train_cpu, train_memory)
            gpus(tr, accelerator_type, train_gpus)
            place(tr, node_selector=node_selector, tolerations=tolerations, shm_size="16Gi",
                  timeout_s=size["train"].timeout_s)
            plan = shard_plan(**common)
            plan.set_display_name("plan embed shards").set_caching_options(True)
            cluster(plan, "shard_plan")
            place(plan, mlflow=False, gcs=False, timeout_s=steps["shard_plan"].timeout_s)
            with dsl.ParallelFor(plan.output, name="embed-shards",
                                 parallelism=embed_parallelism) as shard:
                part = embed(canonical=data, model=tr.outputs["model"], shard_index=shard, **common)
                part.set_display_name("embed shard").set_caching_options(True)
                cluster(part, "embed", embed_cpu, embed_memory)
                gpus(part, accelerator_type, embed_gpus)
                place(part, node_selector=node_selector, tolerations=tolerations, shm_size="4Gi",
                      mlflow=False, timeout_s=size["embed"].timeout_s)
            emb = merge_embeddings(shards=dsl.Collected(part.outputs["embeddings"]), **tracked)
            emb.set_display_name("merge embeddings").set_caching_options(False)
            idx = index(embeddings=emb.outputs["embeddings"], **common, **tracked)
            idx.set_display_name("index").set_caching_options(False)
            ev = evaluate(canonical=data, embeddings=emb.outputs["embeddings"],
                          model=tr.outputs["model"], index=idx.outputs["index"],
                          **common, **tracked)
            ev.set_display_name("evaluate").set_caching_options(False)
            cluster(ev, "evaluate", embed_cpu, embed_memory)
            place(ev, timeout_s=res.EVALUATE_TIMEOUT_S)
            reg = register(model=tr.outputs["model"], evaluation=ev.outputs["evaluation"],
                           index=idx.outputs["index"], **common, **tracked)
            reg.set_display_name("register").set_caching_options(False)
            with dsl.If(reg.outputs["Output"] == "promote", name="gate passed"):
                prom = promote(decision=reg.outputs["decision"], **common, **tracked)
                prom.set_display_name("promote to champion").set_caching_options(False)
                cluster(prom, "promote")
                place(prom, timeout_s=steps["promote"].timeout_s)
            for task, step in ((ing, "ingest"), (mine, "mine_pairs"), (val, "validate"),
                               (emb, "merge_embeddings"), (idx, "index"), (reg, "register")):
                cluster(task, step)
                place(task, timeout_s=steps[step].timeout_s)

    return dsl.pipeline(name=PIPELINE_NAME, description=(
        "Train NoteLLM-2 multimodal note representations, embed and index the notes, evaluate "
        "R@K by the reference protocol and register the model in MLflow with alias 'challenger'.")
    )(notellm2_pipeline if kubernetes_settings else _without(notellm2_pipeline, PLACEMENT))


notellm2_pipeline = make_pipeline()
