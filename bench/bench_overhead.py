"""Overhead of ``LearnedLR`` over ``CosineAnnealingLR``: time of one full training step with each.

One step = forward, backward, ``optimizer.step()``, ``scheduler.step(...)``, ``zero_grad()``. Both
schedulers run the same model, data and optimizer; the difference of the median step times is what reading
features and running the controller costs. Runs alternate in blocks (cosine, learned, cosine, ...) so that
drift of the machine (thermal, other processes) hits both alike, and the median of the per-block medians is
reported. The scheduler's own cost is also timed in isolation (``sched.step`` alone) because on a noisy
machine the difference of two ~ms step times is noisier than the thing being measured. With one thread
on CPU the clock is the thread's CPU time, which a loaded machine does not inflate (see ``time_block``).

Usage (figures in BENCHMARKS.md)::

    .venv/bin/python bench/bench_overhead.py                     # small CNN on CPU, 1 thread
    .venv/bin/python bench/bench_overhead.py --device cuda       # + ResNet-18 when a GPU is present
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from metalr import LearnedLR, LRController


def small_cnn() -> nn.Module:
    """The MNIST CNN of examples/mnist_cnn.py (two conv blocks and a 128-unit head, ~420k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def resnet18() -> nn.Module:
    import torchvision  # optional: only for the GPU figure

    return torchvision.models.resnet18(num_classes=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    model: nn.Module, scheduler_kind: str, x: Tensor, y: Tensor, steps: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A closure running one training step, and one running only ``sched.step`` (for the isolated timing)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if scheduler_kind == "cosine":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=steps
        )
    else:
        sched = LearnedLR(optimizer, LRController(), total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    last_loss: list[Tensor] = []

    def sched_step() -> None:
        if isinstance(sched, LearnedLR):
            sched.step(last_loss[0])
        else:
            sched.step()

    def step() -> None:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        last_loss[:] = [loss.detach()]
        sched_step()
        optimizer.zero_grad()

    return step, sched_step


def time_block(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Median seconds per call over ``n`` calls.

    On CPU with one torch thread this is the CPU time of the calling thread (``time.thread_time``): all the
    work runs in that thread, and unlike wall time it does not count the time other processes held the
    core, so the figures hold on a shared machine. On CUDA it is wall time after a synchronize.
    """
    clock = time.perf_counter if device.type == "cuda" or torch.get_num_threads() > 1 else time.thread_time
    times = []
    for _ in range(n):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def bench(
    name: str,
    build: Callable[[], nn.Module],
    device: torch.device,
    batch: tuple[Tensor, Tensor],
    blocks: int,
    per_block: int,
) -> None:
    x, y = batch
    torch.manual_seed(0)
    model_cos = build().to(device)
    model_learned = build().to(device)
    model_learned.load_state_dict(model_cos.state_dict())
    total = blocks * per_block * 4 + 100
    step_cos, sched_cos = make_step(model_cos, "cosine", x, y, total)
    step_learned, sched_learned = make_step(model_learned, "learned", x, y, total)
    for _ in range(10):  # warm-up: allocator, kernels, lazy inits
        step_cos()
        step_learned()
    cos_t, learned_t, sched_only = [], [], []
    for _ in range(blocks):
        cos_t.append(time_block(step_cos, per_block, device))
        learned_t.append(time_block(step_learned, per_block, device))
    # sched.step alone (the gradients of the last step are still meaningful input: zero_grad set them None,
    # so run one backward first to time the realistic path with gradients present).
    x_loss = nn.functional.cross_entropy(model_learned(x), y)
    x_loss.backward()
    for _ in range(blocks):
        sched_only.append(
            time_block(sched_learned, per_block, device) - time_block(sched_cos, per_block, device)
        )
    cos_ms, learned_ms = statistics.median(cos_t) * 1e3, statistics.median(learned_t) * 1e3
    extra_ms = statistics.median(sched_only) * 1e3
    params = sum(p.numel() for p in model_cos.parameters())
    print(
        f"{name:<28} params={params:>10,d}  step cosine={cos_ms:8.3f} ms  step learned={learned_ms:8.3f} ms  "
        f"diff={100 * (learned_ms - cos_ms) / cos_ms:+6.2f}%  |  sched.step extra={extra_ms:.3f} ms "
        f"= {100 * extra_ms / cos_ms:.2f}% of the step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds ResNet-18)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 = stable numbers)")
    parser.add_argument("--blocks", type=int, default=7, help="alternating timing blocks")
    parser.add_argument("--per-block", type=int, default=30, help="steps per block")
    parser.add_argument("--batch-sizes", default="32,128", help="comma-separated CNN batch sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batch = (torch.randn(bs, 1, 28, 28, device=device), torch.randint(0, 10, (bs,), device=device))
        bench(f"small CNN (MNIST), batch {bs}", small_cnn, device, batch, args.blocks, args.per_block)
    if device.type == "cuda":
        for bs in (32, 128):
            batch = (torch.randn(bs, 3, 32, 32, device=device), torch.randint(0, 10, (bs,), device=device))
            bench(f"ResNet-18 (CIFAR), batch {bs}", resnet18, device, batch, args.blocks, args.per_block)


if __name__ == "__main__":
    main()
