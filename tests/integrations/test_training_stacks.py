"""``LearnedLR`` in the training stacks of issue 9: mixed precision, gradient accumulation, clipping,
``torch.compile`` and ``DistributedDataParallel`` (2 CPU processes, gloo).

Each test checks what the controller *sees* (loss and gradient in the feature state) and that the LR
trajectory is the one the plain single-process, full-precision loop would give where the stacks promise it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metalr import LRController
from metalr.scheduler import LearnedLR


def active_controller(seed: int = 0) -> LRController:
    controller = LRController()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controller.net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return controller.requires_grad_(False)


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def data(
    steps: int, batch: int, dtype: torch.dtype = torch.float32, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 6, generator=generator, dtype=dtype),
            torch.randn(batch, 1, generator=generator, dtype=dtype),
        )
        for _ in range(steps)
    ]


def global_grad_norm(model: nn.Module) -> float:
    return math.sqrt(
        sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)
    )


# -- gradient accumulation -------------------------------------------------------------------------------


def test_accumulating_4_micro_batches_equals_one_batch_4x_larger() -> None:
    """float64 makes the two gradient sums agree to ~1e-16, so the LRs must agree to ~1e-12."""
    batches = data(12, 32, torch.float64)

    def run(micro_batches: int) -> list[float]:
        model = mlp(torch.float64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = LearnedLR(optimizer, active_controller(), total_steps=len(batches))
        lrs = []
        for x, y in batches:
            for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
                loss = nn.functional.mse_loss(model(xs), ys)
                (loss / micro_batches).backward()
                sched.observe_loss(loss)
            optimizer.step()
            sched.step()  # the mean of the observed micro-batch losses
            optimizer.zero_grad()
            lrs.append(sched.get_last_lr()[0])
        return lrs

    one_batch, accumulated = run(1), run(4)
    assert len(set(one_batch)) > 3, "the controller should move the LR for the comparison to mean something"
    assert accumulated == pytest.approx(one_batch, rel=1e-12, abs=0)


# -- gradient clipping -----------------------------------------------------------------------------------


def test_features_read_the_clipped_gradient_the_optimizer_applied() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=3)
    for x, y in data(3, 16):
        nn.functional.mse_loss(model(x) * 100, y).backward()  # large gradients: clipping is active
        pre_clip = float(nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5))
        applied = global_grad_norm(model)
        optimizer.step()
        sched.step(torch.tensor(1.0))
        optimizer.zero_grad()
        assert pre_clip > 1.0
        assert float(sched._state.features.grad_norm) == pytest.approx(applied, rel=1e-5)
        assert applied == pytest.approx(0.5, rel=1e-4)


# -- mixed precision -------------------------------------------------------------------------------------


def test_bfloat16_autocast_on_cpu() -> None:
    """Gradients of an autocast model live in the parameters' dtype; the loss may come back in bfloat16."""
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = LearnedLR(optimizer, active_controller(), total_steps=8)
    for x, y in data(8, 16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = (out.float() - y).square().mean().to(torch.bfloat16)
        assert out.dtype == torch.bfloat16 and loss.dtype == torch.bfloat16
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        grad_norm = global_grad_norm(model)
        optimizer.step()
        sched.step(loss)
        optimizer.zero_grad()
        assert float(sched._state.features.grad_norm) == pytest.approx(grad_norm, rel=1e-5)
        assert math.isfinite(sched.get_last_lr()[0]) and sched.get_last_lr()[0] > 0
    assert float(sched._last_loss) == pytest.approx(float(loss.detach()), rel=1e-6)


def _scaler_run(
    device: str, dtype: torch.dtype, poison_step: int | None
) -> tuple[list[float], list[float], LearnedLR]:
    model = mlp().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    sched = LearnedLR(optimizer, active_controller(), total_steps=6, scaler=scaler)
    lrs, observed_grad_norms = [], []
    for t, (x, y) in enumerate(data(6, 16)):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device, dtype=dtype):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if t == poison_step:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        sched.step(loss)
        optimizer.zero_grad()
        lrs.append(sched.get_last_lr()[0])
        observed_grad_norms.append(float(sched._state.features.grad_norm))
    return lrs, observed_grad_norms, sched


def _check_scaler_semantics(device: str, dtype: torch.dtype) -> None:
    clean_lrs, clean_norms, clean = _scaler_run(device, dtype, poison_step=None)
    # The scale is 2**12, yet the features read gradient norms of an unscaled model (O(1), not O(4096)).
    assert clean.skipped_steps == 0 and max(clean_norms) < 50
    poisoned_lrs, _, poisoned = _scaler_run(device, dtype, poison_step=2)
    assert poisoned.skipped_steps == 1 and poisoned.last_epoch == 5
    # The skipped step changed nothing: the LR after it is the LR before it ...
    assert poisoned_lrs[2] == poisoned_lrs[1]
    # ... and the guardrail did not fire (the controller never saw the inf), so the LR is not cut.
    assert not poisoned.guard_triggered
    assert all(math.isfinite(lr) and lr > 0 for lr in poisoned_lrs)


def test_grad_scaler_skipped_steps_do_not_advance_the_controller_cpu() -> None:
    _check_scaler_semantics("cpu", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 GradScaler path needs CUDA")
def test_grad_scaler_skipped_steps_do_not_advance_the_controller_cuda() -> None:
    _check_scaler_semantics("cuda", torch.float16)


def test_scaler_verdict_read_between_step_and_update() -> None:
    """Calling sched.step before scaler.update() also detects the skip (from the scaler's own record)."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    sched = LearnedLR(optimizer, active_controller(), total_steps=4, scaler=scaler)
    x, y = data(1, 8)[0]
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    scaler.step(optimizer)
    sched.step(loss)
    scaler.update()
    assert sched.skipped_steps == 1 and sched.last_epoch == 0


# -- torch.compile ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_gives_the_eager_lr_trajectory() -> None:
    torch._dynamo.reset()
    batches = data(6, 16)

    def run(compile_model: bool) -> list[float]:
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = LearnedLR(optimizer, active_controller(), total_steps=len(batches))
        forward = torch.compile(model, backend="inductor") if compile_model else model
        lrs = []
        for x, y in batches:
            loss = nn.functional.mse_loss(forward(x), y)
            loss.backward()
            optimizer.step()
            sched.step(loss)
            optimizer.zero_grad()
            lrs.append(sched.get_last_lr()[0])
        return lrs

    eager = run(False)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = run(True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    # The scheduler runs eagerly outside the user's graph: one graph, no graph breaks, no recompiles
    # caused by the LR changing every step.
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


# -- DistributedDataParallel (2 CPU processes, gloo) -----------------------------------------------------


def _ddp_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        results = {}
        for sync_loss in (None, False):
            model = nn.parallel.DistributedDataParallel(mlp(seed=rank))  # DDP broadcasts rank 0's weights
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            sched = LearnedLR(optimizer, active_controller(), total_steps=8, sync_loss=sync_loss)
            lrs, losses = [], []
            for x, y in data(8, 16, seed=100 + rank):  # each rank its own shard
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                sched.step(loss)
                optimizer.zero_grad()
                lrs.append(sched.get_last_lr()[0])
                losses.append(float(loss))
            results[str(sync_loss)] = {"lrs": lrs, "losses": losses}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other is still inside it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_compute_the_same_lr_bit_for_bit(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # Default (sync_loss=None): on, since a 2-rank process group is initialised.
    synced0, synced1 = rank0["None"], rank1["None"]
    assert synced0["losses"] != synced1["losses"], (
        "the ranks must see different data for the test to mean something"
    )
    assert synced0["lrs"] == synced1["lrs"]  # exact equality of Python floats: bit for bit
    assert len(set(synced0["lrs"])) > 1
    # Without the loss all-reduce the rank-local losses would make the ranks' LRs drift apart.
    assert rank0["False"]["lrs"] != rank1["False"]["lrs"]
