"""The cross-rank InfoNCE on two gloo processes, checked by its gradients.

Each rank holds half of the pairs. The loss value of a data-parallel step is the mean of the
ranks' losses; its gradient is the mean of the ranks' parameter gradients (what DeepSpeed's
all-reduce computes). Both must equal the single-process loss and gradient over the union batch,
in float64 to 1e-6 — a gather that drops the gradient of the other ranks' copies of a note gets the
value right and the gradient about 20 % wrong.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.loss import info_nce, notellm2_loss

N, D, WORLD = 4, 8, 2  # pairs per rank, input width, ranks


def _data():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)
    b = torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)
    keys = torch.arange(2 * WORLD * N)
    return a, b, keys


def _encoder() -> torch.nn.Module:
    """A shared encoder with a temperature, in float64, the same on every rank."""
    torch.manual_seed(1)
    enc = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    enc.log_scale = torch.nn.Parameter(torch.tensor(2.5))
    return enc.double()


def _loss(enc, a, b, keys) -> torch.Tensor:
    ea, eb = F.normalize(enc(a), dim=-1), F.normalize(enc(b), dim=-1)
    return info_nce(ea, eb, enc.log_scale, keys=keys)


def _rank_slice(rank: int, a, b, keys):
    sl = slice(rank * N, (rank + 1) * N)
    return a[sl], b[sl], torch.cat([keys[:WORLD * N][sl], keys[WORLD * N:][sl]])


def _mean_grads(module) -> dict[str, torch.Tensor]:
    """Parameter gradients averaged over ranks, as the data-parallel engine applies them."""
    out = {}
    for name, p in module.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().clone()
        dist.all_reduce(g)
        out[name] = g / dist.get_world_size()
    return out


def _encoder_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    enc = _encoder()
    loss = _loss(enc, *_rank_slice(rank, *_data()))
    loss.backward()
    value = loss.detach().clone()
    dist.all_reduce(value)
    torch.save({"loss": value / WORLD, "grads": _mean_grads(enc)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(worker, tmp_path, *args) -> dict:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for k in ranks[0]["grads"]:  # the all-reduce left every rank with the same step
        torch.testing.assert_close(ranks[1]["grads"][k], ranks[0]["grads"][k], rtol=0, atol=0)
    return ranks[0]


def _assert_same_gradients(got: dict, want: dict) -> None:
    assert set(got) == set(want) and want
    for name, g in want.items():
        scale = max(1.0, float(g.abs().max()))
        assert float((got[name] - g).abs().max()) <= 1e-6 * scale, name


@pytest.mark.slow
def test_two_gloo_ranks_give_the_whole_batch_loss_and_gradient(tmp_path):
    dist_run = _spawn(_encoder_worker, tmp_path)
    enc = _encoder()
    loss = _loss(enc, *_data())
    loss.backward()
    torch.testing.assert_close(dist_run["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
    want = {n: p.grad for n, p in enc.named_parameters()}
    _assert_same_gradients(dist_run["grads"], want)
    # the negatives grow with the world size: one rank alone scores a different loss
    alone = _loss(_encoder(), *_rank_slice(0, *_data()))
    assert not torch.isclose(alone, dist_run["loss"])


def _extra():
    """Two hard negatives per pair (features of notes outside the pairs), keys after the pairs'."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(2 * WORLD * N, D, generator=g, dtype=torch.float64), \
        torch.arange(2 * WORLD * N, 4 * WORLD * N)


def _loss_with_extra(enc, a, b, keys, x, xkeys) -> torch.Tensor:
    ea, eb, ex = (F.normalize(enc(t), dim=-1) for t in (a, b, x))
    return notellm2_loss({"n_m": torch.cat([ea, eb, ex])}, enc.log_scale, 1.0, 0.0,
                         keys=torch.cat([keys, xkeys]), n_pairs=len(a))["loss"]


def _extra_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    enc = _encoder()
    x, xkeys = _extra()
    sl = slice(rank * 2 * N, (rank + 1) * 2 * N)
    loss = _loss_with_extra(enc, *_rank_slice(rank, *_data()), x[sl], xkeys[sl])
    loss.backward()
    torch.save({"grads": _mean_grads(enc)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_hard_negatives_keep_the_whole_batch_gradient_on_two_ranks(tmp_path):
    """Every rank's look-alikes are negatives of every anchor, with gradient both ways."""
    dist_run = _spawn(_extra_worker, tmp_path)
    enc = _encoder()
    _loss_with_extra(enc, *_data(), *_extra()).backward()
    _assert_same_gradients(dist_run["grads"], {n: p.grad for n, p in enc.named_parameters()})


# -- the same property through the real network --------------------------------------------------


def _notes():
    from PIL import Image

    from model import NoteInput

    return [NoteInput(f"title {i}", f"words about thing {i} " * (1 + i % 3), ("t", f"x{i % 5}"),
                      Image.new("RGB", (40, 30), (25 * i % 255, 90, 255 - 15 * i)))
            for i in range(4 * WORLD * N // 2)]


def _network():
    from model import build_model
    from tests.model.test_model import CFG, CORPUS

    # float64 so that 1e-6 tests the maths, not rounding; eval() turns dropout off
    return build_model(CFG, corpus=CORPUS, seed=0, dtype=torch.float64).eval()


def _network_loss(model, notes, keys) -> torch.Tensor:
    from model.collator import NoteCollator

    batch = NoteCollator(model)(notes)
    out = model(**batch)
    cfg = model.config
    return notellm2_loss(out, model.log_scale, cfg.loss_weight_m, cfg.loss_weight_v,
                         keys=keys)["loss"]


def _network_batch(rank: int | None):
    """Rank r's pairs (all pairs when None) as [a_1..a_n, b_1..b_n] notes and keys."""
    notes = _notes()
    pairs = [(i, WORLD * N + i) for i in range(WORLD * N)]
    if rank is not None:
        pairs = pairs[rank * N:(rank + 1) * N]
    order = [p[0] for p in pairs] + [p[1] for p in pairs]
    return [notes[i] for i in order], torch.tensor(order)


def _network_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    model = _network()
    loss = _network_loss(model, *_network_batch(rank))
    loss.backward()
    torch.save({"grads": _mean_grads(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_network_trained_on_two_ranks_steps_as_on_the_whole_batch(tmp_path):
    """LLM, Q-Former, fusion, head and temperature all receive the whole-batch gradient."""
    dist_run = _spawn(_network_worker, tmp_path)
    model = _network()
    _network_loss(model, *_network_batch(None)).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("connector.") for n in want) and "log_scale" in want
    _assert_same_gradients(dist_run["grads"], want)
