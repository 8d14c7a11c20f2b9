"""The cross-rank gather: two gloo processes see the negatives of both, so the mean of their
losses equals the single-process loss on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.loss import info_nce

N, D, WORLD = 4, 8, 2


def _data():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(WORLD * N, D, generator=g), dim=-1)
    b = F.normalize(torch.randn(WORLD * N, D, generator=g), dim=-1)
    keys = torch.arange(2 * WORLD * N)
    return a, b, keys


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    a, b, keys = _data()
    sl = slice(rank * N, (rank + 1) * N)
    local_a = a[sl].clone().requires_grad_(True)
    local_keys = torch.cat([keys[:WORLD * N][sl], keys[WORLD * N:][sl]])
    loss = info_nce(local_a, b[sl], torch.tensor(3.0), keys=local_keys)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad_finite": bool(torch.isfinite(local_a.grad).all())},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    a, b, _ = _data()
    single = info_nce(a, b, torch.tensor(3.0), gather=False)
    gathered = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(gathered, single)
    assert all(r["grad_finite"] for r in ranks)
    # each rank alone (no gather) would see fewer negatives: a different, smaller loss
    alone = info_nce(a[:N], b[:N], torch.tensor(3.0), gather=False)
    assert not torch.isclose(alone, ranks[0]["loss"])
