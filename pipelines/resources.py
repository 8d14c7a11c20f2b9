"""What each task of the compiled pipeline asks the cluster for: CPU, memory, a deadline, retries.

One table, read by :mod:`pipelines.pipeline` at compile time. ``SIZES`` holds the tasks whose
needs grow with the model (train, embed, and evaluate, which embeds the test notes again with the
champion): per preset, they become the defaults of the pipeline parameters ``train_cpu``,
``train_memory``, ``embed_cpu``, ``embed_memory`` (a run can change them in the UI). ``STEPS``
holds the tasks whose needs depend on the data, not the model: compiled in as constants.

Requests equal limits for memory (a pod is never OOM-killed for using what it asked for, and is
never scheduled on a node that cannot give it). Timeouts are the pods' ``activeDeadlineSeconds``
(kfp-kubernetes ``set_timeout``: an integer at compile time, per attempt: a retried task gets a
new pod and a new deadline).
"""

from __future__ import annotations

from dataclasses import dataclass

HOUR = 3600


@dataclass(frozen=True)
class Size:
    cpu: str  # Kubernetes quantity, request and limit
    memory: str  # request and limit
    timeout_s: int  # the pod's activeDeadlineSeconds


@dataclass(frozen=True)
class Retry:
    """``PipelineTask.set_retry``: attempts after the first, the first wait, its growth, and
    the longest wait between two attempts."""
    retries: int
    backoff: str = "60s"
    factor: float = 2.0
    max_backoff: str = "900s"


# model-sized tasks, per preset (the keys of components.common.config.PRESETS)
SIZES: dict[str, dict[str, Size]] = {
    # CPU demo: a 2-layer model, a few hundred steps
    "tiny": {"train": Size("2", "8Gi", 2 * HOUR), "embed": Size("2", "4Gi", 1 * HOUR)},
    # Qwen2.5-0.5B + CLIP ViT-B/16 on one GPU node: data loading and image decoding workers
    "qwen2-0.5b-clip-b16": {"train": Size("8", "64Gi", 24 * HOUR),
                            "embed": Size("4", "32Gi", 6 * HOUR)},
    # Qwen2-7B: ZeRO-3 on 8 GPUs; rank 0 gathers the 16-bit weights (~15 GB) to export them
    "qwen2-7b-clip-b16": {"train": Size("32", "384Gi", 72 * HOUR),
                          "embed": Size("8", "64Gi", 12 * HOUR)},
}
DEFAULT_SIZING = "tiny"

# data-sized tasks: the same for every preset
STEPS: dict[str, Size] = {
    "settings": Size("100m", "256Mi", 10 * 60),
    "ingest": Size("2", "8Gi", 4 * HOUR),
    "mine_pairs": Size("2", "8Gi", 4 * HOUR),
    "validate": Size("4", "8Gi", 4 * HOUR),  # image checks run data.image_check_workers threads
    "validate_gate": Size("100m", "256Mi", 10 * 60),
    "shard_plan": Size("100m", "256Mi", 10 * 60),
    "merge_embeddings": Size("2", "8Gi", 2 * HOUR),
    "index": Size("4", "16Gi", 6 * HOUR),
    "register": Size("2", "8Gi", 2 * HOUR),
    "promote": Size("1", "2Gi", 1 * HOUR),
    "finish_run": Size("100m", "512Mi", 30 * 60),
}
# evaluate embeds the test notes with the champion: embed's memory, its own deadline
EVALUATE_TIMEOUT_S = 12 * HOUR

# Tasks that may run again after a failure without harm, and why:
RETRIES: dict[str, Retry] = {
    # resumes from its last checkpoint (components/train/checkpoint.py); a TrainJob attempt
    # adopts or replaces the job of the attempt before (components/train/trainjob.py)
    "train": Retry(3, backoff="120s", max_backoff="1800s"),
    # pure functions of their inputs: a preempted GPU pod costs one shard
    "embed": Retry(3),
    # re-open their step's MLflow run and overwrite their outputs
    "merge_embeddings": Retry(2, backoff="30s"),
    "index": Retry(2, backoff="30s"),
    "evaluate": Retry(2, backoff="30s"),
    # a retried register finds the version its run registered; promote holds a lease and
    # compares-and-sets (README, "Overlapping runs and retries")
    "register": Retry(2, backoff="30s"),
    "promote": Retry(2, backoff="30s"),
    "finish_run": Retry(2, backoff="30s"),
}
# Not retried: settings and validate_gate (deterministic: a second attempt fails the same way),
# ingest, mine_pairs and validate (a refused data set is refused again; a transient storage error
# is rare beside the cost of re-reading every image), shard_plan (config only).


def sizes(preset: str) -> dict[str, Size]:
    if preset not in SIZES:
        raise ValueError(f"no resource sizes for preset {preset!r}; sized presets: "
                         f"{', '.join(SIZES)} (add it to pipelines/resources.py)")
    return SIZES[preset]
