"""Overhead of ``LearnedLR`` over ``CosineAnnealingLR``: time and memory of one full training step with each.

One step = forward, backward, ``optimizer.step()`` (with LearnedLR's hooks), ``scheduler.step(...)``,
``zero_grad()``. Both schedulers run the same model, data and optimizer. The two stacks are stepped
alternately, one step each (cosine, learned, cosine, ...), so drift of a shared machine hits both alike;
the figure is the median of the paired per-step differences, over the median cosine step. With one thread
on CPU the clock is the thread's CPU time, which other processes do not inflate (see ``timed``).
Memory: the bytes of every tensor the scheduler holds (its own attributes and its buffer in the optimizer's
state) over the model's parameter bytes, and the largest tensor in ``sched.state_dict()``.

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
) -> tuple[Callable[[], None], torch.optim.lr_scheduler.LRScheduler]:
    """A closure running one training step, and the scheduler it steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if scheduler_kind == "cosine":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=steps
        )
    else:
        sched = LearnedLR(optimizer, LRController(), total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if isinstance(sched, LearnedLR):
            sched.step(loss.detach())
        else:
            sched.step()
        optimizer.zero_grad()

    return step, sched


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call: the calling thread's CPU time on CPU with one torch thread (all the work runs in
    that thread, and time other processes held the core is not counted), wall time after a sync otherwise."""
    clock = time.perf_counter if device.type == "cuda" or torch.get_num_threads() > 1 else time.thread_time
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def scheduler_bytes(sched: LearnedLR, model: nn.Module) -> tuple[float, int]:
    """(bytes of the tensors the scheduler holds / parameter bytes, numel of the largest state_dict tensor)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max((t.numel() for t in sched.state_dict()["feature_state"].values()), default=0)
    return sched.held_tensor_bytes() / param_bytes, largest


def bench(
    name: str, build: Callable[[], nn.Module], device: torch.device, batch: tuple[Tensor, Tensor], steps: int
) -> None:
    x, y = batch
    torch.manual_seed(0)
    model_cos = build().to(device)
    model_learned = build().to(device)
    model_learned.load_state_dict(model_cos.state_dict())
    step_cos, _ = make_step(model_cos, "cosine", x, y, steps + 20)
    step_learned, sched_learned = make_step(model_learned, "learned", x, y, steps + 20)
    for _ in range(10):  # warm-up: allocator, kernels, lazy inits
        step_cos()
        step_learned()
    cosine, differences = [], []
    for _ in range(steps):
        a = timed(step_cos, device)
        b = timed(step_learned, device)
        cosine.append(a)
        differences.append(b - a)
    cos_ms = statistics.median(cosine) * 1e3
    extra_ms = statistics.median(differences) * 1e3
    assert isinstance(sched_learned, LearnedLR)
    ratio, largest = scheduler_bytes(sched_learned, model_learned)
    params = sum(p.numel() for p in model_cos.parameters())
    print(
        f"{name:<28} params={params:>10,d}  step cosine={cos_ms:8.3f} ms  paired extra={extra_ms:+.3f} ms "
        f"-> learned/cosine = {1 + extra_ms / cos_ms:.4f}x  |  held tensors = {ratio:.2f}x params, "
        f"largest state_dict tensor = {largest} elements",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds ResNet-18)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 = stable numbers)")
    parser.add_argument("--steps", type=int, default=240, help="paired steps per configuration")
    parser.add_argument("--batch-sizes", default="32,64,128", help="comma-separated CNN batch sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batch = (torch.randn(bs, 1, 28, 28, device=device), torch.randint(0, 10, (bs,), device=device))
        bench(f"small CNN (MNIST), batch {bs}", small_cnn, device, batch, args.steps)
    if device.type == "cuda":
        for bs in (32, 128):
            batch = (torch.randn(bs, 3, 32, 32, device=device), torch.randint(0, 10, (bs,), device=device))
            bench(f"ResNet-18 (CIFAR), batch {bs}", resnet18, device, batch, args.steps)


if __name__ == "__main__":
    main()
