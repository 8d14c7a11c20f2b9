"""The run configuration: frozen dataclasses, named presets, ``section.key=value`` overrides.

One source of truth: the CLI, the KFP pipeline parameters (``preset`` + ``overrides``) and every
step resolve the same :class:`RunConfig` with :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace

from model.config import ModelConfig


@dataclass(frozen=True)
class DataConfig:
    # Tolerances of the validate step's suites (components/validate/suites.py).
    # Broken images allowed (share of notes naming an image) and notes without an image (share
    # of notes) before validation fails; within it those notes are dropped and listed.
    max_broken_image_share: float = 0.0
    min_train_pairs: int = 1
    min_test_pairs: int = 1
    image_check_workers: int = 8
    # generous bounds: the official notes have short titles and up to ~1,000 characters of text
    max_title_chars: int = 1_000
    max_content_chars: int = 20_000
    # share of notes with an empty title / content (topic-only notes have an empty content)
    max_empty_title_share: float = 0.5
    max_empty_content_share: float = 0.5
    # share of events that name a note present in the notes files
    min_known_event_note_share: float = 0.9
    # Reading (components/common/readers.py, notes.py). The text encoding of the official CSV
    # files and events.csv: bytes that do not decode are an error naming file, row, line, field
    # and byte offset, never silently replaced. Set the file's real encoding to read it (e.g.
    # "gb18030" for GBK/GB2312 exports, "latin-1"); a non-UTF-8 encoding is reported as a warning.
    encoding: str = "utf-8"
    # Images: a picture of more pixels (width x height) is refused as broken before it is decoded
    # (a decompression bomb: a few KB of PNG can claim 10^10 pixels); 64 M pixels is above any
    # phone camera up to 48 MP and ~192 MB as RGB. Also Pillow's own limit (its bomb warning made
    # an error) in every process that imports components.common.notes, wherever it decodes.
    max_image_pixels: int = 64_000_000
    # an image file larger than this is refused as broken without being read whole
    max_image_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"data.encoding: unknown text encoding {self.encoding!r} "
                             "(e.g. utf-8, gb18030, latin-1)") from None
        if min(self.max_image_pixels, self.max_image_bytes) < 1:
            raise ValueError("data.max_image_pixels and data.max_image_bytes must be at least 1")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = -1  # -1: run `epochs` epochs
    epochs: float = 1.0
    batch_pairs: int = 16  # pairs per process; 2x notes
    lr: float = 3e-6
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.1
    # after the linear warmup: "cosine" decay to 0, "linear" decay to 0 (the reference recipe's
    # warmup-decay), or "constant"
    lr_schedule: str = "cosine"
    # the model written at the end: "last" (the final weights) or "best" (the weights of the
    # validation step with the lowest validation loss; needs validation pairs)
    export: str = "last"
    # chance that a training image is mirrored left-right (the reference recipe's random
    # horizontal flip); 0 = never. Validation and inference never flip.
    hflip: float = 0.0
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 10
    val_every: int = 100
    num_workers: int = 2
    # preprocessed pixels kept in memory per process, shared by its DataLoader workers and kept
    # across epochs (components.common.notes.PixelCache): a kept note's image is decoded once
    pixel_cache_mb: float = 2048.0
    # learning-rate multiplier for the newly initialised parts (connector, fusion, head)
    new_params_lr_mult: float = 1.0
    # extra negatives per pair (components/train/hard_negatives.py): "none", or
    # "one_modality" = the pair's query note's nearest note in wording whose picture differs
    # and its nearest in picture whose wording differs, mined once from raw features among at
    # most hard_negative_pool training-split notes (the step encodes 2 more notes per pair)
    hard_negatives: str = "one_modality"
    hard_negative_pool: int = 100_000
    # model.fusion=concat: training-split notes the exported model's channel whitening is
    # fitted on (a seeded sample; 0 = leave the channels unwhitened)
    whiten_notes: int = 4096
    # -- DeepSpeed on N processes (components/train/launch.py, worker.py, ds_config.py) --
    # processes on this node: 0 = one per visible GPU (1 on CPU); >1 runs torchrun
    nproc: int = 0
    threads_per_proc: int = 0  # torch threads per CPU process; 0 = cores // nproc
    zero_stage: int = 2  # 0 (plain data parallel) .. 3 (parameters sharded too)
    offload: bool = False  # optimizer state (and with stage 3 the parameters) in CPU memory
    grad_accum: int = 1  # micro-batches per optimizer step; pairs per step = batch_pairs x nproc x this
    precision: str = "auto"  # "auto" (bf16 on GPUs that have it, fp32 on CPU), "bf16", "fp32"
    # checkpoints: every n steps and at the end, the last `keep_checkpoints` kept; a restarted
    # run with the same checkpoint folder resumes from the newest complete one.
    # "" = <parent of the model output>/checkpoints (a KFP task's own output folder)
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    checkpoint_dir: str = ""
    resume: bool = True  # False: delete this folder's checkpoints and start over
    # -- where the processes run (components/train/trainjob.py) --
    # "local": in the KFP task's pod (torchrun there when nproc > 1); "trainjob": a Kubeflow
    # Trainer TrainJob of `num_nodes` pods, each running torchrun over its processes (`nproc`,
    # 0 = one per GPU); data and model must then live under a gs:// pipeline root
    launcher: str = "local"
    num_nodes: int = 1
    gpus_per_node: int = 0  # nvidia.com/gpu per TrainJob pod; 0 = CPU (DeepSpeed's CPU accelerator)
    # TrainJob pod cpu / memory (Kubernetes quantities, requests = limits); "" = none requested:
    # the TrainJob's resources replace the runtime's, they do not merge with them
    cpu_per_node: str = ""
    memory_per_node: str = ""
    trainjob_runtime: str = "notellm2-deepspeed"  # the ClusterTrainingRuntime (torch policy)
    trainjob_namespace: str = ""  # "" = the namespace of the pod that submits it
    trainjob_image: str = ""  # "" = the component image (components.common.image)
    trainjob_timeout_s: int = 86_400  # also the TrainJob's activeDeadlineSeconds
    # torch.distributed timeout of every collective (init_process_group's `timeout`): a rank
    # that waits at a barrier while the others upload their checkpoint shards to gs:// must not
    # time out (NCCL's default is 10 minutes), so this is sized for the slowest upload
    pg_timeout_s: int = 3600
    # the lease on the checkpoint root (components/train/lease.py) that the launching task
    # holds and renews while the TrainJob runs; a lease not renewed for this long is stale
    lease_ttl_s: int = 600

    def __post_init__(self) -> None:
        if self.launcher not in ("local", "trainjob"):
            raise ValueError(f"train.launcher must be local or trainjob, not {self.launcher!r}")
        if min(self.pg_timeout_s, self.lease_ttl_s) < 60:
            raise ValueError("train.pg_timeout_s and train.lease_ttl_s must be at least 60 "
                             "(seconds)")
        if min(self.num_nodes, self.trainjob_timeout_s) < 1 or self.gpus_per_node < 0:
            raise ValueError("train.num_nodes and train.trainjob_timeout_s must be at least 1, "
                             "train.gpus_per_node not negative")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.lr_schedule must be cosine, linear or constant, "
                             f"not {self.lr_schedule!r}")
        if self.hard_negatives not in ("none", "one_modality"):
            raise ValueError(f"train.hard_negatives must be none or one_modality, "
                             f"not {self.hard_negatives!r}")
        if self.whiten_notes < 0 or self.whiten_notes == 1:
            raise ValueError("train.whiten_notes must be 0 (off) or at least 2")
        if self.hard_negative_pool < 2:
            raise ValueError("train.hard_negative_pool must be at least 2")
        if self.export not in ("last", "best"):
            raise ValueError(f"train.export must be last or best, not {self.export!r}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"train.hflip must lie in [0, 1], not {self.hflip}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be auto, bf16 or fp32, not {self.precision!r}")
        if min(self.grad_accum, self.keep_checkpoints, self.batch_pairs) < 1:
            raise ValueError("train.grad_accum, train.keep_checkpoints and train.batch_pairs "
                             "must be at least 1")
        if min(self.log_every, self.val_every) < 1:
            raise ValueError("train.log_every and train.val_every must be at least 1")
        if min(self.nproc, self.threads_per_proc, self.checkpoint_every) < 0:
            raise ValueError("train.nproc, train.threads_per_proc and train.checkpoint_every "
                             "must not be negative")


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 64
    scope: str = "all"  # "all" notes or only the "test" notes
    # parallel embed tasks (dsl.ParallelFor), each taking a contiguous 1/num_shards of the notes
    num_shards: int = 1
    # preprocessed pixels of test notes kept per embed process for the image_only probe, which
    # then decodes no image again (PixelCache; 0 = decode again)
    pixel_cache_mb: float = 512.0

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"embed.num_shards must be at least 1, got {self.num_shards}")


@dataclass(frozen=True)
class IndexConfig:
    """The FAISS index over the note vectors (``components/index``), inner product on unit vectors.
    Sizes are counts of vectors; the choices behind the defaults are measured in
    ``tests/benchmarks/bench_index.py``."""

    # a FAISS index factory string ("Flat", "IVF2048,Flat", "HNSW32", ...), used as given, or
    # "auto": exact "Flat" up to `flat_max` vectors; above it, on the CPU, the fastest of
    # measured candidates (Flat, IVF at three list counts, HNSW32, IVF fast-scan PQ with exact
    # re-ranking) reaching `target_recall` on held-out queries over a sample of `select_sample`
    # vectors (components/index/run.py, select_factory); on GPUs "IVF{nlist},Flat" with nlist
    # the power of two nearest 4*sqrt(N) (and at most N/39, FAISS's floor per list)
    factory: str = "auto"
    flat_max: int = 200_000
    select_sample: int = 200_000  # vectors the auto candidates are built and measured on
    # lists searched per query; 0 = the smallest on a ladder of +19 % steps (1, 2, 3, ..., 8, 10,
    # 11, 13, 16, ...) whose leave-one-out recall@recall_k vs exact search on a sample of
    # collection vectors reaches `target_recall` + `recall_margin` (found by galloping and
    # bisecting; HNSW indexes tune efSearch the same way)
    nprobe: int = 0
    target_recall: float = 0.95
    # knobs are tuned to target_recall + recall_margin on one sample of queries, so that other
    # queries (the check sample, fresh queries) still reach the target; a check sample below
    # the target steps the knob up until it reaches it too
    recall_margin: float = 0.01
    train_sample: int = 0  # vectors the quantiser is trained on; 0 = min(N, max(64*nlist, 65536))
    add_batch: int = 65_536  # vectors per add() call
    recall_k: int = 100
    recall_queries: int = 1_000  # per sample; nprobe is tuned on one, recall reported on another
    expected_dim: int = 0  # 0 = no check; else a different vector width is an error
    use_gpu: str = "auto"  # "auto" (all GPUs faiss sees, CPU when none), "never", "always"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.use_gpu not in ("auto", "never", "always"):
            raise ValueError(f"index.use_gpu must be auto, never or always, not {self.use_gpu!r}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"index.target_recall must be in (0, 1], not {self.target_recall}")
        if not 0.0 <= self.recall_margin < 1.0:
            raise ValueError(f"index.recall_margin must be in [0, 1), not {self.recall_margin}")
        if min(self.add_batch, self.recall_k, self.recall_queries) < 1:
            raise ValueError("index.add_batch, index.recall_k and index.recall_queries must be "
                             "at least 1")
        if min(self.flat_max, self.nprobe, self.train_sample, self.expected_dim,
               self.select_sample) < 0:
            raise ValueError("index.flat_max, index.nprobe, index.train_sample, "
                             "index.expected_dim and index.select_sample must not be negative")


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (10, 20, 50, 100, 1000, 10000, 100000, 1000000)
    probes: bool = True
    query_chunk: int = 1024
    # slices short/long query and target by text length (title + content characters) when the
    # data brings no length slices of its own; threshold 0 = the median over the test notes
    length_slices: bool = True
    length_threshold_chars: int = 0
    # R@K through the built index (what serving returns) for K up to this, beside the exact R@K
    index_max_k: int = 1000
    # test pairs whose image-vs-text saliency (model/saliency.py) is summarised; 0 = off
    saliency_pairs: int = 16
    # fusion diagnostics (components/evaluate/fusion.py): test pairs per slice whose fused
    # vectors' text share is measured with the model (0 = off), and the unrelated note pairs
    # the probe channels' partner cosines are set against
    fusion_pairs: int = 256
    fusion_unrelated_sample: int = 20000
    # champion vs challenger: paired bootstrap over the test queries
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    ci_level: float = 0.95


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "notellm2"
    alias: str = "challenger"
    # the promotion gate (components/register/promote.py)
    promote_metric: str = "R@100"
    min_delta_ci_low: float = 0.0  # the interval's lower bound of ΔR@K must exceed this
    max_regression: float = 0.02  # no slice or probe may lose more R@K than this
    absolute_bar: float = 0.1  # R@K the first version needs when there is no champion
    # the evidence floor: fewer evaluated test queries never promote (with 50 queries one query
    # is 0.02 of R@K and a paired-bootstrap interval is still wide; with 1 it is a point)
    min_eval_queries: int = 50
    # the A/B plan
    ab_traffic_challenger: float = 0.1
    ab_alpha: float = 0.05
    ab_power: float = 0.8
    ab_primary_metric: str = "click-through rate of the related-notes slot"
    ab_guardrail_metrics: tuple[str, ...] = ("p99 retrieval latency", "empty-result rate",
                                             "dwell time per click")


@dataclass(frozen=True)
class MineConfig:
    """How training pairs are mined from behaviour logs and split (``components/mine_pairs``).
    Times in seconds, shares in [0, 1)."""

    use_events: bool = True  # mine pairs when the data has events; False keeps the given pairs
    window_s: float = 3600.0  # a view counts for clicks up to this many seconds after it
    min_score_quantile: float = 0.0  # drop pairs scoring below this quantile of all scores
    max_score_quantile: float = 1.0  # ... or above this one (outliers, e.g. bot-like bursts)
    top_k: int = 10  # partners kept per note
    min_users: int = 2  # keep pairs that at least this many distinct users produced; not applied
    #                     (a warning says so) where too few notes would keep a pair (sparse logs)
    symmetric: bool = True  # undirected pairs, s(A→B) + s(B→A); see the module docstring
    split: str = "time"  # time | note | none
    test_after: str = ""  # ISO time; events at or after it are test. "" = the test_share quantile
    test_share: float = 0.2  # share of events (time split) or of notes (note split) for test
    val_share: float = 0.1  # share of the train pairs held out to watch the validation loss
    seed: int = 0
    # above this many events (Parquet row counts from the file footer; CSV/JSONL: file size /
    # 48 bytes) the step streams the events into user buckets on local disk and scores one bucket
    # at a time instead of reading them all; the in-memory step peaks near 550 B an event
    # (0.73 GiB RSS at 1M events, tests/benchmarks/bench_mine_scale.py), so ~1.3 GiB at the limit
    in_memory_max_events: int = 2_000_000

    def __post_init__(self) -> None:
        if self.in_memory_max_events < 1:
            raise ValueError(f"in_memory_max_events must be at least 1, got "
                             f"{self.in_memory_max_events}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be positive, got {self.window_s}")
        if not 0.0 <= self.min_score_quantile <= self.max_score_quantile <= 1.0:
            raise ValueError("need 0 <= min_score_quantile <= max_score_quantile <= 1, got "
                             f"{self.min_score_quantile}, {self.max_score_quantile}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.min_users < 1:
            raise ValueError(f"min_users must be at least 1, got {self.min_users}")
        if self.split not in ("time", "note", "none"):
            raise ValueError(f"split must be time, note or none, got {self.split!r}")
        for name in ("test_share", "val_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class RunConfig:
    # the product's model: the paper's NoteLLM-2 with its late fusion as a whitened
    # concatenation (model/network.py: ConcatFusion); ModelConfig itself keeps the paper's gate,
    # so exports written before the change load as what they are
    model: ModelConfig = field(default_factory=lambda: ModelConfig(fusion="concat"))
    data: DataConfig = field(default_factory=DataConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """``{"train.lr": 3e-06, ...}`` — for MLflow params and error messages."""
        return {f"{s}.{k}": v for s, sect in self.to_dict().items() for k, v in sect.items()}


PRESETS: dict[str, dict[str, object]] = {
    # CPU tests and the demo: a 2-layer Qwen2, a 2-layer CLIP at 32 px and a 2-layer Q-Former,
    # a few hundred steps. The tiny vision tower starts from random weights, so it is trained
    # (a frozen random tower only adds noise); real presets keep their pretrained tower frozen.
    "tiny": {
        "model.train_vision": True,
        "model.image_size": 32, "model.num_query_tokens": 4, "model.max_tokens": 96,
        "model.qformer_layers": 2, "model.qformer_hidden_size": 64, "model.qformer_heads": 4,
        "model.qformer_cross_attention_frequency": 1,
        "model.tiny_hidden_size": 64, "model.tiny_vision_hidden_size": 64,
        "train.max_steps": 300, "train.epochs": 1000.0, "train.batch_pairs": 32,
        "train.lr": 2e-3, "train.warmup_ratio": 0.05, "train.weight_decay": 0.0,
        "train.log_every": 10, "train.val_every": 100, "train.num_workers": 0,
        "embed.batch_size": 128,
    },
    # The paper's recipe at a size one GPU node handles (weights from the hub at run time).
    # The reference recipe: 16 pairs per GPU, 1 epoch, lr 3e-6 with 10 % linear warmup and linear
    # decay, weight decay 1e-3, random horizontal flips; image size from the tower's processor.
    "qwen2-0.5b-clip-b16": {
        "model.llm": "Qwen/Qwen2.5-0.5B", "model.vision": "openai/clip-vit-base-patch16",
        "model.num_query_tokens": 16,
        "train.batch_pairs": 16, "train.lr": 3e-6, "train.epochs": 1.0,
        "train.lr_schedule": "linear", "train.hflip": 0.5,
        "train.new_params_lr_mult": 100.0,
    },
    "qwen2-7b-clip-b16": {
        "model.llm": "Qwen/Qwen2-7B", "model.vision": "openai/clip-vit-base-patch16",
        "model.num_query_tokens": 16, "model.gradient_checkpointing": True,
        "train.batch_pairs": 16, "train.lr": 3e-6, "train.epochs": 1.0,
        "train.lr_schedule": "linear", "train.hflip": 0.5, "train.zero_stage": 3,
        "train.new_params_lr_mult": 100.0,
    },
}
DEFAULT_PRESET = "tiny"


class ConfigError(ValueError):
    pass


def _coerce(value: str | object, typ, key: str):
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if origin is tuple:
            (inner, *_) = typing.get_args(typ)
            items = json.loads(value) if value.strip().startswith("[") else value.split(",")
            return tuple(inner(x) for x in items if str(x).strip())
        if typ is str or isinstance(typ, types.UnionType):
            return value
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(typ, '__name__', typ)}") from None
    return value


def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def valid_keys() -> list[str]:
    return sorted(RunConfig().flat())


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.max_steps=50)")
        out[key.strip()] = value.strip()
    return out


def resolve(preset: str = DEFAULT_PRESET, overrides: list[str] | dict | None = None) -> RunConfig:
    """Preset + overrides -> RunConfig. Unknown presets and keys are errors listing valid ones."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    values: dict[str, object] = dict(PRESETS[preset])
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides or []))
    cfg = RunConfig()
    sections = {f.name: f.type for f in fields(RunConfig)}
    unknown = [k for k in values if k.partition(".")[0] not in sections
               or k.partition(".")[2] not in {f.name for f in fields(getattr(cfg, k.partition(".")[0]))}]
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}. Valid keys:\n  "
                          + "\n  ".join(valid_keys()))
    changes: dict[str, dict[str, object]] = {}
    for key, value in values.items():
        sect, _, name = key.partition(".")
        hints = _hints(type(getattr(cfg, sect)))
        changes.setdefault(sect, {})[name] = _coerce(value, hints[name], key)
    try:
        return replace(cfg, **{s: replace(getattr(cfg, s), **kv) for s, kv in changes.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


# The settings people tune, as typed pipeline parameters (what the KFP UI shows and its run
# comparison lines up), and the config key each sets. Their defaults (0, 0.0, "") mean "the
# preset's value".
TUNED: dict[str, str] = {
    "train_steps": "train.max_steps",
    "learning_rate": "train.lr",
    "batch_pairs": "train.batch_pairs",
    "model_variant": "model.variant",
    "llm": "model.llm",
    "vision": "model.vision",
}


def merge_overrides(preset: str, overrides: list[str] | tuple[str, ...],
                    **tuned: object) -> list[str]:
    """``overrides`` followed by ``key=value`` for every tuned parameter that is set (not 0, 0.0
    or ""), checked by resolving them on ``preset``. A key given both ways must agree: two
    different values are an error naming both, never a silent choice."""
    unknown = sorted(set(tuned) - set(TUNED))
    if unknown:
        raise ConfigError(f"unknown tuned parameter(s) {', '.join(unknown)}; known: "
                          f"{', '.join(TUNED)}")
    given = parse_overrides(list(overrides))
    merged = [str(o) for o in overrides]
    for name, value in tuned.items():
        if value in (None, "") or (not isinstance(value, str) and value == 0):
            continue
        key = TUNED[name]
        text = str(value)
        if key in given:
            if _same(given[key], text, key):
                continue
            raise ConfigError(f"{name}={text} and the override {key}={given[key]} disagree: "
                              "set it in one place")
        merged.append(f"{key}={text}")
    resolve(preset, merged)  # a bad value fails here, before any data is read
    return merged


def _same(a: str, b: str, key: str) -> bool:
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False
