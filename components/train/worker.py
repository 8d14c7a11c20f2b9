"""One training process: a DeepSpeed engine on one GPU or one group of CPU threads.

``python -m components.train.worker JOB.json`` under torchrun (one per process), or
:func:`train` in the caller's process for a single one. Every rank loads the data, builds the
same model, and runs the same engine: ZeRO stage 0-3 with optional CPU offload, bf16 on GPUs and
fp32 on CPUs, AdamW with warmup + cosine decay, gradient accumulation. The loss gathers the
embeddings of every rank, so the negatives grow with the number of processes. Rank 0 alone talks
to MLflow and writes the exported model; every rank writes its share of each checkpoint.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from components.common import storage, tracking
from components.common.config import RunConfig
from components.common.notes import LazyNotes, configure_images
from components.train import lease
from components.train.checkpoint import (
    DS_TAG,
    STATE,
    CheckpointStore,
    data_fingerprint,
    default_root,
    probe,
    step_name,
)
from components.train.data import (
    PairBatches,
    PairOrder,
    PixelCache,
    TrainData,
    make_collate,
    val_batches,
)
from components.train.ds_config import deepspeed_config, train_dtype
from model import NoteLLM2, build_model
from model.collator import NoteCollator
from model.loss import notellm2_loss
from model.network import ConcatFusion, fit_whitening, llm_width, save_whitening
from model.precision import dtype_name

log = logging.getLogger(__name__)

# A test aid: seconds to sleep after every optimizer step, so that a test can kill a run
# between two checkpoints without racing it. Unset in production.
STEP_DELAY_ENV = "NOTELLM2_TRAIN_STEP_DELAY_S"
# config keys that do not change what is trained: a checkpoint written under other values of
# these is still resumed
OPERATIONAL = {"nproc", "threads_per_proc", "checkpoint_every", "keep_checkpoints",
               "checkpoint_dir", "resume", "log_every", "val_every", "num_workers",
               "pixel_cache_mb", "launcher", "num_nodes", "gpus_per_node", "cpu_per_node",
               "memory_per_node", "trainjob_runtime", "trainjob_namespace", "trainjob_image",
               "trainjob_timeout_s", "pg_timeout_s", "lease_ttl_s"}


class NonFiniteLoss(FloatingPointError):
    """The loss turned NaN or inf; nothing was updated with it."""


class NonFiniteGradient(FloatingPointError):
    """The global gradient norm of a step turned NaN or inf (the loss was finite); no checkpoint
    holds the step's update."""


class CheckpointMismatch(RuntimeError):
    """The checkpoint folder holds the run of another configuration or other training data."""


class CheckpointUnreadable(RuntimeError):
    """The checkpoint folder holds complete checkpoints of this run, and none of them loads."""


@dataclass(frozen=True)
class Job:
    """What every process of one training run needs; travels as JSON to the torchrun workers."""
    canonical_dir: str
    model_out: str
    config: dict
    tracking_uri: str = ""
    run_id: str = ""
    progress: bool = False
    result_dir: str = ""  # where rank 0 leaves result.json and a failing rank its error
    threads: int = 0  # torch threads per process; 0 = torch's default

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, path: str) -> Job:
        with open(path) as f:
            return cls(**json.load(f))


def config_from_dict(d: dict) -> RunConfig:
    """Inverse of ``RunConfig.to_dict`` after a JSON round trip (lists back to tuples)."""
    base = RunConfig()
    sections = {}
    for f in fields(RunConfig):
        cls = type(getattr(base, f.name))
        sections[f.name] = cls(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in d[f.name].items()})
    return RunConfig(**sections)


# -- optimisation ------------------------------------------------------------------------------


def lr_lambda(total: int, warmup: int, schedule: str = "cosine"):
    """Learning-rate multiplier per step: linear warmup over ``warmup`` steps, then ``cosine``
    or ``linear`` decay to 0 at ``total``, or ``constant``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(model, cfg: RunConfig) -> list[dict]:
    """The pretrained LLM at ``lr``; the parts that start from scratch (connector, fusion, head,
    temperature) at ``lr * new_params_lr_mult``; no weight decay on norms, biases, temperature."""
    t = cfg.train
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = not name.startswith(("llm.", "vision."))
        decay = p.ndim >= 2
        groups.setdefault((new, decay), []).append(p)
    return [{"params": ps, "lr": t.lr * (t.new_params_lr_mult if new else 1.0),
             "weight_decay": t.weight_decay if decay else 0.0}
            for (new, decay), ps in groups.items()]


class Objective(nn.Module):
    """The engine's module: encodes a batch and returns the loss parts.

    The loss is computed inside ``forward`` so that ZeRO-3 has the temperature gathered while it
    is used (it is registered as an external parameter of this module)."""

    def __init__(self, model: NoteLLM2):
        super().__init__()
        self.model = model

    def forward(self, keys: torch.Tensor, gather: bool = True, n_pairs: torch.Tensor | None = None,
                **batch) -> dict[str, torch.Tensor]:
        out = self.model(**batch)
        cfg = self.model.config
        losses = notellm2_loss(out, self.model.log_scale, cfg.loss_weight_m, cfg.loss_weight_v,
                               keys=keys, gather=gather,
                               n_pairs=int(n_pairs) if n_pairs is not None else None)
        losses["scale"] = self.model.log_scale.detach().float().exp().sum()
        return losses


def engine_module(model: NoteLLM2, ds, stage: int) -> Objective:
    """``model`` made ready for ``deepspeed.initialize`` (the train step and the GPU bench)."""
    # DeepSpeed broadcasts parameters as bytes, which fails for a 0-dim tensor: train the
    # temperature as shape (1,) and give it back its shape at export
    model.log_scale = nn.Parameter(model.log_scale.detach().reshape(1))
    objective = Objective(model)
    if stage == 3:
        # used in the loss, outside the module that owns it
        ds.zero.register_external_parameter(objective, model.log_scale)
    return objective


def build_for_training(cfg: RunConfig, corpus: list[str], ds, ds_config: dict,
                       dtype: torch.dtype) -> NoteLLM2:
    """The model every rank trains, in ``dtype``.

    Under ZeRO-3 it is built partitioned: inside ``deepspeed.zero.Init`` each parameter is
    scattered over the ranks as soon as its module is created (random initialisations are rank
    0's), and with transformers' ``HfDeepSpeedConfig`` alive ``from_pretrained`` reads the
    checkpoint on rank 0 only and hands each layer's weights to its shards. No process holds the
    whole model, which is what lets a 7B preset start on nodes with less host memory than
    ``processes x model size``."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return build_model(cfg.model, corpus=corpus, seed=cfg.train.seed, dtype=dtype)
    # zero.Init patches tensor creation; a model class imported lazily inside it trips over
    # torch._dynamo registering its polyfills, so dynamo is imported first
    import torch._dynamo  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # zero.Init reads the world size from DeepSpeed's own communicator
    ds.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    hf_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- transformers holds a weak reference
    try:
        # no explicit dtype: zero.Init takes it from the config (bf16 there = bf16 here), and
        # an explicit dtype on a CPU accelerator is turned into bf16 by its precedence
        return build_model(cfg.model, corpus=corpus, seed=cfg.train.seed, dtype=dtype,
                           init_context=lambda: ds.zero.Init(config_dict_or_path=ds_config))
    finally:
        unset_hf_deepspeed_config()


def parameter_count(model: nn.Module) -> int:
    """Parameters of the whole model, also when ZeRO-3 holds only a shard of each here."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# -- process set-up ----------------------------------------------------------------------------


def _import_deepspeed(on_gpu: bool):
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    import deepspeed

    if not on_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce for inference kernels
        # (~30 s on 2 cores) when it first opens a process group; training uses gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op probe runs gcc
    # DeepSpeed still calls the torch.distributed names that torch 2.13 renamed
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    return deepspeed


def ensure_process_group(on_gpu: bool, timeout_s: float | None = None) -> None:
    """The default process group: torchrun's (``env://``), or a one-process group of our own;
    ``timeout_s`` (``train.pg_timeout_s``) bounds every collective, sized so that rank 0
    uploading a checkpoint while the others wait at the barrier is no timeout.

    A one-process group stays for the life of the process: DeepSpeed caches group handles in
    module globals (``deepspeed.utils.groups``), so a group destroyed and created again would
    leave it holding a dead one on the next in-process run."""
    if dist.is_initialized():
        return
    kw = ({"backend": "nccl", "device_id": torch.device("cuda", torch.cuda.current_device())}
          if on_gpu else {"backend": "gloo"})
    if timeout_s:
        kw["timeout"] = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(**kw)
    else:
        dist.init_process_group(**kw, store=dist.HashStore(), rank=0, world_size=1)


@contextmanager
def single_process_env():
    """The variables DeepSpeed reads, for a one-process run in the caller's process."""
    want = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    old = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rng_state() -> dict:
    py = random.getstate()
    nps = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [nps[0], nps[1].tolist(), int(nps[2]), int(nps[3]), float(nps[4])],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def fingerprint(cfg: RunConfig, world: int, data: dict | None = None) -> dict:
    """What decides the trajectory of a run; a checkpoint resumes only under the same one: the
    configuration, the number of processes and the training data
    (:func:`components.train.checkpoint.data_fingerprint` of the notes and pairs)."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in OPERATIONAL}
    return {"model": asdict(cfg.model), "train": train, "world_size": world, "data": data}


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # "nan", "inf": JSON has no such numbers


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif json.dumps(x) != json.dumps(y):
            out.append(f"{prefix}{k}: {y!r} there, {x!r} now")
    return out


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- the run -----------------------------------------------------------------------------------


class Trainer:
    """State of one rank's run; :meth:`fit` is the loop."""

    def __init__(self, job: Job):
        self.job = job
        self.cfg = cfg = config_from_dict(job.config)
        configure_images(cfg.data)
        self.t = t = cfg.train
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on_gpu = torch.cuda.is_available()
        self.device = f"cuda:{self.local_rank}" if self.on_gpu else "cpu"
        self.ds = _import_deepspeed(self.on_gpu)

        self.data = data = TrainData.load(job.canonical_dir)
        self.bsz = min(t.batch_pairs, len(data.train) // self.world)
        self.order = PairOrder(len(data.train), max(1, self.bsz), world=self.world,
                               rank=self.rank, seed=t.seed, multiple=t.grad_accum)
        self.steps_per_epoch = self.order.per_epoch // t.grad_accum
        self.total = (t.max_steps if t.max_steps > 0
                      else max(1, math.ceil(t.epochs * self.steps_per_epoch)))
        self.ds_config = deepspeed_config(t, micro_batch=self.bsz, world=self.world,
                                          device=self.device, hidden=llm_width(cfg.model))
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.dtype = train_dtype(t, self.device)

        model = build_for_training(cfg, data.corpus(), self.ds, self.ds_config, self.dtype)
        # what building the model cost in host memory, before the engine adds its own state
        self.build_peak_rss_mib = self.peak_rss_mib()
        self._check_same_vocabulary(model)
        self.model = model
        objective = engine_module(model, self.ds, self.stage)
        torch.manual_seed(t.seed + self.rank)  # dropout differs between ranks, not between runs

        # the fused kernel on GPU (one launch for all master weights; not under CPU offload)
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr,
                                fused=self.on_gpu and not t.offload)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.total, int(t.warmup_ratio * self.total), t.lr_schedule))
        t0 = time.perf_counter()
        self.engine, _, _, self.sched = self.ds.initialize(
            model=objective, optimizer=opt, lr_scheduler=sched, config=self.ds_config,
            dist_init_required=False)
        # what a step sees: every rank's notes are negatives of every anchor (gathered loss)
        self.global_batch = self.bsz * self.world * t.grad_accum
        self.negatives = 2 * self.bsz * self.world - 2
        if t.hard_negatives != "none":  # two look-alikes per pair, of every rank
            self.negatives += 2 * self.bsz * self.world
        if self.rank == 0:
            log.info("DeepSpeed engine (ZeRO %d, %s, %d process(es)) ready in %.2f s",
                     self.stage, dtype_name(self.dtype), self.world, time.perf_counter() - t0)
            log.info("global batch %d pairs per step (%d per process x %d process(es) x %d "
                     "accumulation); %d in-batch negatives per note (2 x %d pairs x %d "
                     "process(es) - 2%s)", self.global_batch, self.bsz, self.world, t.grad_accum,
                     self.negatives, self.bsz, self.world,
                     "" if t.hard_negatives == "none" else " + 2 look-alikes per pair")

        lazy = LazyNotes(data.notes)
        collator = NoteCollator(model)
        cache = (PixelCache(lazy, collator, int(t.pixel_cache_mb * 2**20))
                 if model.vision is not None else None)
        self.collate = make_collate(lazy, collator, cache)  # validation: in-batch negatives only
        look_alikes = None
        if t.hard_negatives == "one_modality":
            t0 = time.perf_counter()
            # rank 0 mines, the others take its answer
            box = [data.look_alikes(t.hard_negative_pool, t.seed) if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            look_alikes = box[0]
            if self.rank == 0:
                log.info("hard negatives: 2 one-modality look-alikes per pair, mined for %d "
                         "query notes in %.1f s; each step encodes %d notes per process",
                         len(look_alikes), time.perf_counter() - t0, 4 * self.bsz)
        train_collate = make_collate(lazy, collator, cache, look_alikes)
        self.pairs = PairBatches(data.train, data.row_of)
        # a generator of its own: each new iterator draws a seed from it, which would otherwise
        # come from the global RNG and shift the dropout masks of a resumed run
        self.loader = torch.utils.data.DataLoader(
            self.pairs, batch_sampler=self.order, collate_fn=train_collate,
            num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed))
        self.val = PairBatches(data.val, data.row_of) if data.val is not None else None
        self.store = CheckpointStore(default_root(job.model_out, t.checkpoint_dir),
                                     t.keep_checkpoints)
        self.fingerprint = fingerprint(cfg, self.world, data_fingerprint(
            data.notes, {"train": data.train, "val": data.val}))
        # DeepSpeed's ZeRO and bf16 optimizers compute the global gradient norm of each step (and
        # skip a step whose norm is not finite); the plain engine (stage 0, fp32) hands the
        # gradients to the torch optimizer as they are, so the worker computes the norm itself
        self.own_grad_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")
        self.step, self.epoch, self.position = 0, 0, 0
        self.resumed_metrics: dict[str, float] = {}  # the last checkpoint's, when resumed
        # train.export=best: the step and validation loss of the weights kept as the best
        self.best: dict = {"step": None, "val_loss": None}
        self.delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)

    def _check_same_vocabulary(self, model) -> None:
        vocab = json.dumps(sorted(model.tokenizer.get_vocab().items())).encode()
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, hashlib.sha1(vocab).hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError("the ranks built different tokenizers from the same notes")

    def peak_rss_mib(self) -> float:
        """The largest peak resident memory of any rank's process (Linux reports KiB)."""
        import resource

        peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
        peak = peak.to(self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return float(peak)

    # -- checkpoints -------------------------------------------------------------------------

    def _barrier(self) -> None:
        dist.barrier()

    def resume(self) -> int | None:
        """Load the newest complete checkpoint that loads, if any; returns its step.

        A checkpoint of another configuration or of other training data (notes, pairs) is
        refused with :class:`CheckpointMismatch` rather than resumed: the folder belongs to
        another run, and neither resuming its weights nor deleting them is this run's call
        (point ``train.checkpoint_dir`` elsewhere, or ``train.resume=false`` to clear it).

        A complete checkpoint that does not load is passed over for the next older one, with a
        warning naming it: its files are checked against the marker on storage (rank 0), every
        node's copy is opened file by file (:func:`probe`), all before the engine loads
        anything, so the ranks agree before any of them enters DeepSpeed's collective load;
        an error in the load itself falls back the same way. When no complete checkpoint loads,
        :class:`CheckpointUnreadable`: training from scratch over them is left to
        ``train.resume=false``."""
        t = self.t
        steps: list[int] = []
        if self.rank == 0:
            if t.resume:
                steps = self.store.complete_steps()
            else:
                lease.verify(self.store.root, os.environ.get(lease.OWNER_ENV, ""))
                self.store.clear()
        steps = _broadcast(steps)
        failed = []
        for step in reversed(steps):
            problem = self._load(step)
            if problem is None:
                return step
            failed.append(f"{step_name(step)}: {problem}")
            if self.rank == 0:
                older = [s for s in steps if s < step]
                log.warning("checkpoint %s does not load (%s); %s", self.store.path(step), problem,
                            f"resuming from the older {step_name(older[-1])} instead" if older
                            else "no older complete checkpoint is left")
        if failed:
            raise CheckpointUnreadable(
                f"none of the complete checkpoints in {self.store.root} loads "
                f"({'; '.join(failed)}). Delete them, or set train.resume=false to start over")
        return None

    def _agree(self, mine: str | None) -> str | None:
        """Every rank's problem (or None) to every rank; the first one found, naming its rank."""
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        bad = [(r, p) for r, p in enumerate(everyone) if p is not None]
        return None if not bad else (bad[0][1] if self.world == 1
                                     else f"rank {bad[0][0]}: {bad[0][1]}")

    def _load(self, step: int) -> str | None:
        """(every rank) Load checkpoint ``step`` into the engine and the loop's position; returns
        why it could not, or None."""
        problem, state = None, None
        if self.rank == 0:
            problem = self.store.check(step)
            if problem is None:
                state = self.store.read_state(step)
        problem, state = _broadcast((problem, state))
        if problem is not None:
            return problem
        diff = _differences(self.fingerprint, state["fingerprint"])
        if diff:
            data, config = (any(d.startswith("data") == x for d in diff) for x in (True, False))
            who = ("another configuration on other training data" if data and config
                   else "a run on other training data" if data else "another configuration")
            raise CheckpointMismatch(
                f"the checkpoints in {self.store.root} were written by {who} "
                f"({'; '.join(d[:300] for d in diff[:8])}). Point train.checkpoint_dir "
                "elsewhere, delete them, or set train.resume=false to start over")
        mine, path = None, None
        try:
            path = self.store.local_copy(step, download=self.local_rank == 0)
        except Exception as e:  # noqa: BLE001 -- a failed download, whatever the client raises
            mine = f"download: {type(e).__name__}: {e}"
        self._barrier()
        if mine is None and self.local_rank == 0:
            mine = probe(path)
        if (problem := self._agree(mine)) is not None:
            return problem
        try:
            loaded, _ = self.engine.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
            if loaded is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}/{DS_TAG}")
            with open(os.path.join(path, f"rng-rank-{self.rank:05d}.json")) as f:
                rng = json.load(f)
        except Exception as e:  # noqa: BLE001 -- whatever a bad shard makes torch raise
            mine = f"{type(e).__name__}: {str(e)[:300]}"
        if (problem := self._agree(mine)) is not None:
            return problem  # an older checkpoint's load replaces whatever this one left
        _set_rng_state(rng)
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.resumed_metrics = state["metrics"]
        self.best = state.get("best", self.best)
        log.info("rank %d resumed from %s at step %d (epoch %d, micro-batch %d)", self.rank,
                 self.store.path(step), self.step, self.epoch, self.position)
        return None

    def save(self, metrics: dict[str, float]) -> str:
        """Every rank writes its share; rank 0 publishes the folder once all have."""
        step, first_of_node = self.step, self.local_rank == 0
        if first_of_node:
            self.store.prepare(step)
        self._barrier()
        tmp = self.store.staging(step)
        self.engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False)
        with open(os.path.join(tmp, f"rng-rank-{self.rank:05d}.json"), "w") as f:
            json.dump(_rng_state(), f)
        if self.rank == 0:
            epoch, position = self.epoch, self.position
            if position >= self.order.per_epoch:
                epoch, position = epoch + 1, 0
            state = {"step": step, "epoch": epoch, "position": position, "total": self.total,
                     "lr": self.sched.get_last_lr()[0], "metrics": metrics, "best": self.best,
                     "fingerprint": self.fingerprint, "ds_config": self.ds_config}
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump(state, f, indent=1)
        self._barrier()
        if first_of_node:
            self.store.sync(step)  # on disk before the marker can say so
            self.store.upload(step)
        self._barrier()
        path = self.store.path(step)
        if self.rank == 0:
            lease.verify(self.store.root, os.environ.get(lease.OWNER_ENV, ""))
            path = self.store.publish(step, {"world_size": self.world})
            removed = self.store.prune(current=step)
            log.info("checkpoint %s%s", path, f" (removed {', '.join(removed)})" if removed else "")
        self._barrier()
        return path

    # -- the loop ----------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """Mean in-batch loss over the held-out pairs (no cross-rank negatives, so the figure
        does not depend on the number of processes); the batches are spread over the ranks."""
        batches = val_batches(len(self.val), max(1, min(self.bsz, len(self.val))))
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for r in range(math.ceil(len(batches) / self.world)):
            i = r * self.world + self.rank
            # ranks without a batch in the last round run one with weight 0: under ZeRO-3
            # every rank must take part in every forward pass
            weight = 1.0 if i < len(batches) else 0.0
            batch = self.collate([self.val[j] for j in batches[i if weight else 0]])
            keys = batch.pop("keys").to(self.device)
            losses = self.engine(keys=keys, gather=False, **self._to_device(batch))
            for k, v in losses.items():
                if k != "scale":
                    sums[k] = sums.get(k, 0.0) + weight * v.detach().float()
        self.engine.train()
        names = sorted(sums)
        total = torch.stack([sums[k] for k in names])
        dist.all_reduce(total)
        return {f"val/{k}": float(v) / len(batches) for k, v in zip(names, total, strict=True)}

    def _diagnose(self, mine: dict, record: dict) -> tuple[str, str]:
        """Every rank got here together: rank 0 writes the diagnostic of step ``self.step + 1``
        (``record`` and every rank's ``mine``). Returns where it is and the last complete
        checkpoint's path (or 'none')."""
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine)
        last = self.store.latest() if self.rank == 0 else None
        where = self.store.diagnostic(self.step + 1)
        if self.rank == 0:
            storage.write_text(where, json.dumps({
                "step": self.step + 1, **record, "epoch": self.epoch,
                "lr": self.sched.get_last_lr()[0], "ranks": everyone,
                "last_complete_checkpoint": self.store.path(last) if last is not None else None,
            }, indent=1, default=str))
        last = _broadcast(last)
        return where, self.store.path(last) if last is not None else "none"

    def _nonfinite(self, keys: torch.Tensor, losses: dict, micro: int) -> None:
        """Every rank got here together: write the diagnostic (rank 0) and stop everyone."""
        where, last = self._diagnose(
            {"rank": self.rank, "note_ids": self.data.note_ids(keys.tolist()),
             "loss": {k: _json_float(float(v)) for k, v in losses.items()}},
            {"kind": "loss", "micro_batch": micro})
        raise NonFiniteLoss(
            f"non-finite loss at step {self.step + 1} (micro-batch {micro}); nothing was updated "
            f"with it. Batch note ids and loss parts: {where}; last complete checkpoint: {last}")

    def _own_grad_norm(self) -> float:
        """The global 2-norm of the gradients the plain engine is about to apply (already
        all-reduced over the ranks at the accumulation boundary)."""
        norms = [torch.linalg.vector_norm(p.grad.detach().float())
                 for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _check_grad_norm(self, norm: float | None, keys: list[torch.Tensor], what: str) -> None:
        """Stop every rank when any rank's gradient norm of this step is NaN or inf (a loss
        scaler's overflow would be no error, but the engine runs in bf16 or fp32: no scaler)."""
        bad = torch.tensor([0.0 if norm is None or math.isfinite(norm) else 1.0],
                           device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            return
        step_keys = torch.cat(keys).tolist() if keys else []
        where, last = self._diagnose(
            {"rank": self.rank, "note_ids": self.data.note_ids(step_keys),
             "grad_norm": _json_float(norm) if norm is not None else None},
            {"kind": "gradient"})
        raise NonFiniteGradient(
            f"non-finite gradient norm ({norm}) at step {self.step + 1} with a finite loss; "
            f"{what}, and no checkpoint was written after it. The step's note ids: {where}; "
            f"last complete checkpoint: {last}")

    def fit(self) -> dict[str, float]:
        t, rank = self.t, self.rank
        ga = t.grad_accum
        pairs_per_step = self.bsz * self.world * ga
        history: dict[str, float] = {}
        window = {"time": 0.0, "steps": 0, "tokens": 0.0}
        sums = torch.zeros(4, dtype=torch.float64)
        saved_at = self.step if self.step > 0 else -1
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                   disable=not (self.job.progress and rank == 0))
        micro = 0
        step_keys: list[torch.Tensor] = []  # the micro-batches of the step being accumulated
        while self.step < self.total:
            self.order.set_epoch(self.epoch, self.position)
            t0 = time.perf_counter()
            for batch in self.loader:
                keys = batch.pop("keys")
                if t.hflip > 0 and "pixel_values" in batch:
                    self._flip(batch["pixel_values"])
                tokens = float(batch["attention_mask"].sum())
                losses = self.engine(keys=keys.to(self.device), **self._to_device(batch))
                has_v = "loss_v" in losses
                stats = torch.stack([losses["loss"].detach().double().cpu(),
                                     losses["loss_m"].detach().double().cpu(),
                                     losses["loss_v"].detach().double().cpu() if has_v
                                     else torch.zeros((), dtype=torch.float64),
                                     torch.tensor(tokens, dtype=torch.float64)])
                # one small all-reduce tells every rank whether any loss went bad, before
                # anything is updated with it
                stats_dev = stats.to(self.device)
                dist.all_reduce(stats_dev)
                stats = stats_dev.cpu()
                if not torch.isfinite(stats).all():
                    self._nonfinite(keys, losses, micro % ga)
                self.engine.backward(losses["loss"])
                step_keys.append(keys)
                boundary = (micro + 1) % ga == 0
                if boundary and self.own_grad_norm:  # checked before anything is updated
                    self._check_grad_norm(self._own_grad_norm(), step_keys,
                                          "nothing was updated with it")
                self.engine.step()
                if boundary and not self.own_grad_norm:
                    norm = self.engine.get_global_grad_norm()
                    self._check_grad_norm(
                        None if norm is None else float(norm), step_keys,
                        "DeepSpeed skipped its update" if not self.engine.was_step_applied()
                        else "its update is in the running weights only, never saved")
                if boundary:
                    step_keys = []
                sums += stats
                window["tokens"] += float(stats[3])
                micro += 1
                self.position += 1
                if micro % ga:
                    continue
                self.step += 1
                window["time"] += time.perf_counter() - t0
                window["steps"] += 1
                bar.update(1)
                if self.delay:
                    time.sleep(self.delay)
                if self.step % t.log_every == 0 or self.step == self.total:
                    n = micro * self.world
                    row = {"loss": float(sums[0]) / n, "loss_m": float(sums[1]) / n}
                    if has_v:
                        row["loss_v"] = float(sums[2]) / n
                    row |= {"scale": float(losses["scale"]), "lr": self.sched.get_last_lr()[0],
                            "pairs_per_s": window["steps"] * pairs_per_step / window["time"],
                            "tokens_per_s": window["tokens"] / window["time"],
                            "epoch": self.epoch + 1}
                    if self.on_gpu:
                        row["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    row["peak_rss_mib"] = self.peak_rss_mib()
                    history |= row
                    bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
                    if rank == 0:
                        tracking.log_metrics({f"train/{k}": v for k, v in row.items()},
                                             step=self.step)
                    sums.zero_()
                    micro = 0
                    window = {"time": 0.0, "steps": 0, "tokens": 0.0}
                if self.val is not None and (self.step % t.val_every == 0
                                             or self.step == self.total):
                    vl = self.validation_loss()
                    history |= vl
                    if rank == 0:
                        tracking.log_metrics(vl, step=self.step)
                    if t.export == "best" and (self.best["val_loss"] is None
                                               or vl["val/loss"] < self.best["val_loss"]):
                        self._keep_best(vl["val/loss"])
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) \
                        or self.step == self.total:
                    self.save(history)
                    saved_at = self.step
                if self.step >= self.total:
                    break
                t0 = time.perf_counter()
            else:
                self.epoch, self.position = self.epoch + 1, 0
        bar.close()
        if saved_at != self.step:
            self.save(history)
        return history

    def _flip(self, pixels: torch.Tensor) -> None:
        """Mirror a random share ``train.hflip`` of the batch's images left-right, in place (the
        batch's own copy: cached pixels are stacked into it). The draw depends on the seed, the
        epoch, the micro-batch and the rank only, so a resumed run flips the same images."""
        g = torch.Generator().manual_seed(
            ((self.t.seed * 1_000_003 + self.epoch) * 1_000_003 + self.position) * 1009 + self.rank)
        flip = torch.rand(pixels.shape[0], generator=g) < self.t.hflip
        pixels[flip] = pixels[flip].flip(-1)

    def _keep_best(self, val_loss: float) -> None:
        """Export the current weights as the best so far (every rank takes part: under ZeRO-3
        the export gathers shards). Kept beside the checkpoints, so a resumed run keeps it."""
        staging = self.store.best_staging()
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.export(staging, with_ds_config=False)
        if self.rank == 0:
            self.store.publish_best(staging, {"step": self.step, "val_loss": val_loss})
            log.info("best validation loss so far: %.4f at step %d", val_loss, self.step)
        self.best = {"step": self.step, "val_loss": val_loss}

    # -- export ------------------------------------------------------------------------------

    def export_final(self) -> int:
        """Write the model ``train.export`` asks for to the model output; returns its step."""
        if self.t.export == "best":
            if self.best["step"] is not None:
                if self.rank == 0:
                    self.store.fetch_best(self.job.model_out)
                    with open(os.path.join(self.job.model_out, "ds_config.json"), "w") as f:
                        json.dump(self.ds_config, f, indent=2)
                self._barrier()
                return self.best["step"]
            if self.rank == 0:
                log.warning("train.export=best but there are no validation pairs: exporting the "
                            "last weights")
        self.export(self.job.model_out)
        return self.step

    def calibrate_export(self) -> None:
        """Fit the exported model's channel whitening (``model.fusion=concat``) on a seeded
        sample of ``train.whiten_notes`` training-split notes and write it beside the weights.
        Rank 0 reloads the export (the last or the best weights, whichever was written) and
        encodes the sample; the other ranks wait."""
        t = self.t
        if self.cfg.model.fusion != "concat" or not self.cfg.model.uses_fusion \
                or t.whiten_notes == 0:
            return
        if self.rank == 0:
            t0 = time.perf_counter()
            model = NoteLLM2.from_pretrained(self.job.model_out, map_location=self.device,
                                             dtype=self.dtype)
            keys = list(self.data.train_keys)
            if len(keys) > t.whiten_notes:
                rng = np.random.default_rng(t.seed)
                keys = sorted(rng.choice(keys, size=t.whiten_notes, replace=False).tolist())
            sample = LazyNotes(self.data.notes.iloc[keys])  # images read batch by batch
            fit_whitening(model, sample, device=self.device,
                          batch_size=max(8, 2 * self.bsz), progress=self.job.progress)
            save_whitening(model, self.job.model_out)
            log.info("channel whitening fitted on %d training notes in %.1f s", len(keys),
                     time.perf_counter() - t0)
        self._barrier()

    def export(self, path: str, with_ds_config: bool = True) -> None:
        """The model's current weights in ``save_pretrained`` format at ``path``, written by
        rank 0.

        The weights are those the engine computed with (fp32 on CPU, bf16 on GPU); under ZeRO-3
        each parameter is gathered from its shards in turn, so no rank holds the whole model on
        its device at once."""
        module = self.engine.module.model
        stage3 = self.stage == 3
        state: dict[str, torch.Tensor] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            with self.ds.zero.GatheredParameters([tensor], enabled=stage3 and hasattr(tensor, "ds_id")):
                if self.rank == 0:
                    state[name] = tensor.detach().to("cpu", copy=True)
        if self.rank == 0:
            state["log_scale"] = state["log_scale"].reshape(())
            export_state(module, state, path)
            if with_ds_config:
                with open(os.path.join(path, "ds_config.json"), "w") as f:
                    json.dump(self.ds_config, f, indent=2)
        self._barrier()


def export_state(module: NoteLLM2, state: dict[str, torch.Tensor], path: str) -> None:
    """``save_pretrained`` of a model shaped like ``module`` holding ``state``: the skeleton is
    built on the meta device and takes the tensors as they are (no second copy of the weights)."""
    from transformers import AutoModel

    trust = module.config.trust_remote_code
    with torch.device("meta"):
        llm = AutoModel.from_config(module.llm.config, trust_remote_code=trust)
        vision = (AutoModel.from_config(module.vision.config)
                  if module.vision is not None else None)
        skeleton = NoteLLM2(module.config, llm, vision, module.tokenizer, module.image_processor)
    skeleton.load_state_dict(state, strict=True, assign=True)
    if isinstance(module.fusion, ConcatFusion):  # its whitening is no part of the state dict
        skeleton.fusion.set_whitening_from(module.fusion)
    skeleton.save_pretrained(path)


def train(job: Job) -> dict[str, float]:
    """Run this process's share of the training job; rank 0 returns the final metrics."""
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ensure_process_group(on_gpu, config_from_dict(job.config).train.pg_timeout_s)
    trainer = Trainer(job)
    rank = trainer.rank
    track = (tracking.step_run(job.tracking_uri, job.run_id, "train") if rank == 0
             else nullcontext())
    with track as step:
        if rank == 0:
            _log_run_params(trainer, job.run_id)
        resumed = trainer.resume()
        history = trainer.fit()
        history["exported_step"] = float(trainer.export_final())
        trainer.calibrate_export()
        # host memory over the whole run (validation, checkpoints and export included), and
        # that of building the model alone
        history["peak_rss_mib"] = trainer.peak_rss_mib()
        history["build_peak_rss_mib"] = trainer.build_peak_rss_mib
        if rank == 0:
            tracking.log_metrics({f"train/{k}": history[k] for k in
                                  ("exported_step", "peak_rss_mib", "build_peak_rss_mib")},
                                 step=trainer.total)
        # an attempt that resumed at the end trains nothing: the checkpoint's metrics stand
        final = trainer.resumed_metrics | history
        if rank == 0:
            final |= _final_metrics(step.info.run_id)
            _log_curve(step.info.run_id)
            log.info("trained %d steps on %d pairs x %d process(es)%s: %s", trainer.total,
                     len(trainer.data.train), trainer.world,
                     f", resumed at step {resumed}" if resumed is not None else "",
                     {k: round(v, 4) for k, v in final.items()})
    return final


def _log_run_params(trainer: Trainer, pipeline_run_id: str) -> None:
    """The run's whole config on the pipeline's run (what runs are compared by); the DeepSpeed
    config the engine ran with in the train step's run."""
    import mlflow

    params = {k: str(v)[:500] for k, v in trainer.cfg.flat().items()}
    params |= {"train.total_steps": trainer.total, "train.pairs": len(trainer.data.train),
               "train.world_size": trainer.world, "train.micro_batch_pairs": trainer.bsz,
               "train.global_batch_pairs": trainer.global_batch,
               "train.in_batch_negatives": trainer.negatives,
               "train.compute_dtype": dtype_name(trainer.dtype),
               "model.parameters": parameter_count(trainer.model)}
    try:
        tracking.log_to_pipeline_run(pipeline_run_id, params=params)
    except mlflow.exceptions.MlflowException as e:
        # a resumed run may differ in an operational key (e.g. train.checkpoint_every)
        log.warning("MLflow kept the parameters of the earlier attempt: %s", e)
    mlflow.log_dict(trainer.ds_config, "training/ds_config.json")


def _final_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every train/ and val/ metric of the train step's run, across
    restarts."""
    import mlflow

    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    return {k.removeprefix("train/"): v for k, v in metrics.items()
            if k.startswith(("train/", "val/"))}


def _log_curve(run_id: str) -> None:
    """A loss-curve picture in the run's artifacts, from the run's whole metric history (so a
    resumed run draws the steps of its earlier attempts too)."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient()
    curves = {label: sorted({m.step: m.value
                             for m in client.get_metric_history(run_id, key)}.items())
              for key, label in (("train/loss", "train loss"), ("train/loss_m", "L_m"),
                                 ("train/loss_v", "L_v"), ("val/loss", "validation loss"))}
    if not any(curves.values()):  # nothing logged in this run (it resumed at the end)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, pts in curves.items():
        if pts:
            xs, ys = np.array(pts).T
            ax.plot(xs, ys, label=label, marker="o" if label.startswith("val") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "loss_curve.png")
        fig.savefig(path, dpi=100)
        mlflow.log_artifact(path, artifact_path="training")
    plt.close(fig)


def _die_with_parent() -> None:
    """torchrun starts each worker in a session of its own, so killing the launcher's process
    group (a pod's container, a test's SIGKILL) would leave the workers training on. Ask Linux
    to kill this process when its parent, torchrun's agent, dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def _job_from_args(argv: list[str]) -> Job:
    """``JOB.json`` (what :func:`components.train.launch.torchrun` writes), or flags, for a
    launcher of our own (e.g. torchrun on each node of a Kubeflow Trainer ``TrainJob``)."""
    import argparse

    if len(argv) == 1 and argv[0].endswith(".json"):
        return Job.load(argv[0])
    from components.common.config import DEFAULT_PRESET, resolve

    ap = argparse.ArgumentParser(prog="python -m components.train.worker")
    ap.add_argument("--canonical", required=True)
    ap.add_argument("--model-out", required=True)
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--run-id", default="")
    a = ap.parse_args(argv)
    cfg = resolve(a.preset, a.set)
    return Job(a.canonical, a.model_out, cfg.to_dict(), a.tracking_uri, a.run_id,
               threads=cfg.train.threads_per_proc)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: ``python -m components.train.worker JOB.json`` (or flags, see
    :func:`_job_from_args`)."""
    from components.common import logs

    _die_with_parent()
    job = _job_from_args(sys.argv[1:] if argv is None else argv)
    logs.setup()
    rank = int(os.environ.get("RANK", "0"))
    try:
        with single_process_env() if "LOCAL_RANK" not in os.environ else nullcontext():
            final = train(job)
    except BaseException as e:
        if job.result_dir:
            with open(os.path.join(job.result_dir, f"error-rank-{rank:05d}.json"), "w") as f:
                json.dump({"rank": rank, "type": type(e).__name__, "message": str(e),
                           "time": time.time(), "traceback": traceback.format_exc()}, f)
        raise
    if rank == 0 and job.result_dir:
        with open(os.path.join(job.result_dir, "result.json"), "w") as f:
            json.dump(final, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
