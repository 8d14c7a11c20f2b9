"""train: contrastive training of NoteLLM-2 on note pairs, export in ``save_pretrained`` format.

One process for now (DeepSpeed and multi-process come behind this same ``run``). Logs loss,
L_m, L_v, temperature, learning rate and pairs/s to the pipeline's MLflow run, a validation loss
on held-out pairs, and a loss-curve picture.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from components.common import tracking
from components.common.canonical import load_canonical
from components.common.config import RunConfig
from components.common.notes import LazyNotes
from model import build_model
from model.collator import NoteCollator
from model.loss import notellm2_loss

log = logging.getLogger(__name__)


class PairBatches(torch.utils.data.Dataset):
    """Item i = pair i as (key a, key b); keys are row numbers in the note table."""

    def __init__(self, pairs: pd.DataFrame, row_of: dict[str, int]):
        self.a = [row_of[x] for x in pairs["query_id"]]
        self.b = [row_of[x] for x in pairs["target_id"]]

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        return self.a[i], self.b[i]


class PixelCache:
    """Preprocessed pixels per note, kept up to a byte budget: photos are decoded and resized
    once instead of once per epoch (a 2560 px WebP costs ~0.1 s to decode)."""

    def __init__(self, notes: LazyNotes, collator: NoteCollator, max_bytes: int):
        self.notes, self.collator, self.max_bytes = notes, collator, max_bytes
        self.cache: dict[int, torch.Tensor] = {}
        self.bytes = 0

    def get(self, keys: list[int]) -> torch.Tensor:
        missing = [k for k in dict.fromkeys(keys) if k not in self.cache]
        fresh = {}
        if missing:
            px = self.collator.pixels([self.notes.image(k) for k in missing])
            fresh = dict(zip(missing, px, strict=True))
            for k, t in fresh.items():
                size = t.numel() * t.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.cache[k] = t
                    self.bytes += size
        return torch.stack([self.cache[k] if k in self.cache else fresh[k] for k in keys])


def make_collate(notes: LazyNotes, collator: NoteCollator, cache: PixelCache | None):
    def collate(items):
        ka, kb = zip(*items, strict=True)
        keys = list(ka) + list(kb)
        texts = [notes.text(k) for k in keys]
        pixels = cache.get(keys) if cache is not None else None
        batch = collator(texts, pixel_values=pixels)
        batch["keys"] = torch.tensor(keys, dtype=torch.long)  # (2N,)
        return batch

    return collate


def lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

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


def _training_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    return pairs[pairs["query_id"] != pairs["target_id"]].reset_index(drop=True)


@torch.no_grad()
def validation_loss(model, loader, cfg: RunConfig, device: str) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        keys = batch.pop("keys")
        out = model(**batch)
        losses = notellm2_loss(out, model.log_scale, cfg.model.loss_weight_m,
                               cfg.model.loss_weight_v, keys=keys, gather=False)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    model.train()
    return {f"val/{k}": v / max(1, n) for k, v in sums.items()}


def run(canonical_dir: str, model_out: str, cfg: RunConfig, *, tracking_uri: str = "",
        run_id: str = "", progress: bool = True) -> dict[str, float]:
    notes, pairs, _ = load_canonical(canonical_dir)
    allnotes = pd.concat(notes.values(), ignore_index=True)
    row_of = {nid: i for i, nid in enumerate(allnotes["note_id"])}
    lazy = LazyNotes(allnotes)
    train_pairs = _training_pairs(pairs["train"])
    if train_pairs.empty:
        raise ValueError("no training pairs left after dropping self-pairs")
    # the tiny tokenizer learns its vocabulary from the training notes only
    train_ids = set(train_pairs["query_id"]) | set(train_pairs["target_id"])
    train_rows = allnotes[allnotes["note_id"].isin(train_ids)]
    corpus = (train_rows["title"] + " " + train_rows["content"] + " "
              + train_rows["topics"].map(" ".join)).tolist()
    t = cfg.train
    model = build_model(cfg.model, corpus=corpus, seed=t.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    collator = NoteCollator(model)
    cache = (PixelCache(lazy, collator, int(t.pixel_cache_mb * 2**20))
             if model.vision is not None else None)
    collate = make_collate(lazy, collator, cache)
    bsz = min(t.batch_pairs, len(train_pairs))
    gen = torch.Generator().manual_seed(t.seed)
    loader = torch.utils.data.DataLoader(
        PairBatches(train_pairs, row_of), batch_size=bsz, shuffle=True, drop_last=True,
        generator=gen, collate_fn=collate, num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0)
    val_loader = None
    if "val" in pairs and len(_training_pairs(pairs["val"])) > 0:
        val_pairs = _training_pairs(pairs["val"])
        val_loader = torch.utils.data.DataLoader(
            PairBatches(val_pairs, row_of), batch_size=min(bsz, len(val_pairs)),
            collate_fn=collate)
    steps_per_epoch = len(loader)
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(t.warmup_ratio * total)))

    history: list[dict[str, float]] = []
    with tracking.pipeline_run(tracking_uri, run_id):
        import mlflow

        mlflow.log_params({k: str(v)[:500] for k, v in cfg.flat().items()})
        mlflow.log_params({"train.total_steps": total, "train.pairs": len(train_pairs),
                           "model.parameters": sum(p.numel() for p in model.parameters())})
        step, epoch, t0, seen = 0, 0, time.perf_counter(), 0
        bar = tqdm(total=total, desc="train", unit="step", disable=not progress)
        while step < total:
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                keys = batch.pop("keys")
                out = model(**batch)
                losses = notellm2_loss(out, model.log_scale, cfg.model.loss_weight_m,
                                       cfg.model.loss_weight_v, keys=keys)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                sched.step()
                step += 1
                seen += bsz
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if step % t.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - t0
                    row = {k: float(v.detach()) for k, v in losses.items()}
                    row |= {"scale": float(model.log_scale.detach().exp()), "lr": sched.get_last_lr()[0],
                            "pairs_per_s": seen / elapsed, "epoch": epoch + 1}
                    history.append({"step": step, **row})
                    tracking.log_metrics({f"train/{k}": v for k, v in row.items()}, step=step)
                if val_loader is not None and (step % t.val_every == 0 or step == total):
                    vl = validation_loss(model, val_loader, cfg, device)
                    history.append({"step": step, **vl})
                    tracking.log_metrics(vl, step=step)
                if step >= total:
                    break
            epoch += 1
        bar.close()
        model.cpu().eval()
        model.save_pretrained(model_out)
        _log_curve(history)
    final = {k: v for row in history for k, v in row.items() if k != "step"}
    log.info("trained %d steps (%d epochs) on %d pairs: %s", total, epoch, len(train_pairs),
             {k: round(v, 4) for k, v in final.items()})
    return final


def _log_curve(history: list[dict[str, float]]) -> None:
    """A loss-curve picture in the run's artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "train loss"), ("loss_m", "L_m"), ("loss_v", "L_v"),
                       ("val/loss", "validation loss")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            xs, ys = np.array(pts).T
            ax.plot(xs, ys, label=label, marker="o" if key.startswith("val") else None)
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
