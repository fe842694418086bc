"""Reference checks of the core: meta-gradients against finite differences, deploy/train parity,
untrained = constant schedule, determinism, and that meta-training improves held-out tasks."""

from __future__ import annotations

import pytest
import torch

from metalr import LearnedLR, LRController, load_controller
from metalr.config import MetaTrainConfig, build_config
from metalr.meta.inner import make_inner_optimizer
from metalr.meta.trainer import build_controller, meta_train, meta_validate, sample_specs
from metalr.meta.unroll import start_run, unroll
from metalr.tasks import TaskSpec, build_task
from metalr.tasks.optimizers import make_torch_optimizer


def _quadratic_spec(optimizer: str, steps: int = 12, base_lr: float = 0.05) -> TaskSpec:
    return TaskSpec(
        family="noisy_quadratic",
        seed=3,
        optimizer=optimizer,
        base_lr=base_lr,
        steps=steps,
        batch_size=8,
        options={"dim": 6, "condition": 20.0, "noise": 0.3},
    )


def _random_controller(seed: int = 0) -> LRController:
    torch.manual_seed(seed)
    controller = LRController().double()
    with torch.no_grad():  # a non-zero head, so every layer carries meta-gradient
        controller.net.head.weight.normal_(0, 0.3)
        controller.net.head.bias.fill_(0.1)
    return controller


def _meta_loss(controller: LRController, run, length: int) -> torch.Tensor:
    return unroll(controller, run, length, differentiable=True).meta_loss


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_meta_gradient_matches_central_finite_differences(optimizer: str) -> None:
    controller = _random_controller()
    run = start_run(build_task(_quadratic_spec(optimizer)), controller, valid_batch_size=16, dtype=torch.float64)
    run = unroll(controller, run, 3, differentiable=False).run  # start mid-training: features are warmed up
    params = list(controller.parameters())
    grads = torch.autograd.grad(_meta_loss(controller, run, 6), params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
        eps = 1e-6
        with torch.no_grad():
            torch._foreach_add_(params, direction, alpha=eps)
            plus = float(_meta_loss(controller, run, 6))
            torch._foreach_add_(params, direction, alpha=-2 * eps)
            minus = float(_meta_loss(controller, run, 6))
            torch._foreach_add_(params, direction, alpha=eps)
        numeric = (plus - minus) / (2 * eps)
        assert abs(analytic) > 1e-6, "the meta-gradient must not be trivially zero"
        assert abs(analytic - numeric) / abs(numeric) < 1e-4, (optimizer, analytic, numeric)


def test_untrained_controller_is_exactly_the_constant_schedule() -> None:
    controller = LRController()
    spec = create_spec("digits_mlp", steps=40)
    run = start_run(build_task(spec), controller)
    result = unroll(controller, run, spec.steps, differentiable=False)
    assert result.lrs == [pytest.approx(spec.base_lr, rel=1e-6)] * spec.steps


def create_spec(family: str, steps: int, seed: int = 0, optimizer: str | None = None) -> TaskSpec:
    from metalr.tasks import create_task_family

    spec = create_task_family(family).sample(torch.Generator().manual_seed(seed))
    spec = spec.replace(steps=steps)
    return spec.replace(optimizer=optimizer) if optimizer else spec


def _with_faults(task, spike_at: int | None, inf_at: int | None):
    """The task with a loss spike (x1e4) at train batch ``spike_at`` and an inf loss and gradient at ``inf_at``.

    Batches are recognised by content (both loops draw the same deterministic stream), so the fault hits the
    same step in the unroll and in the plain loop whatever else calls the loss (validation batches).
    """
    stream = task.batches("train")
    marked = {k: next(stream)["x"] for k in range(max(i for i in (spike_at, inf_at, 0) if i is not None) + 1)}
    clean = task.loss_fn

    def loss_fn(call, batch):
        loss = clean(call, batch)
        if spike_at is not None and torch.equal(batch["x"], marked[spike_at]):
            return loss * 1e4
        if inf_at is not None and torch.equal(batch["x"], marked[inf_at]):
            return loss * float("inf")
        return loss

    task.loss_fn = loss_fn
    return task


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw"])
def test_the_functional_inner_optimizers_follow_torch_optim_step_for_step(optimizer: str) -> None:
    """The unroll's optimizers are torch.optim's arithmetic (what a deployed controller drives), with LRs that
    change every step and a gradient that is exactly zero in one coordinate (Adam's v = 0 case)."""
    torch.manual_seed(0)
    shapes = [(5, 3), (3,), (1,)]
    start = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(12)]
    for g in grads:
        g[0][0, 0] = 0.0
    lrs = [0.1 * 1.3 ** (k % 5) for k in range(len(grads))]

    inner = make_inner_optimizer(optimizer)
    params, state = tuple(p.clone() for p in start), inner.init(tuple(start))
    reference = [p.clone().requires_grad_(True) for p in start]
    torch_optimizer = make_torch_optimizer(optimizer, reference, lrs[0])
    for g, lr in zip(grads, lrs, strict=True):
        params, state = inner.update(tuple(g), state, params, torch.tensor(lr, dtype=torch.float64))
        for p, gi in zip(reference, g, strict=True):
            p.grad = gi.clone()
        torch_optimizer.param_groups[0]["lr"] = lr
        torch_optimizer.step()
    for ours, theirs in zip(params, reference, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-15)
    assert not torch.equal(params[0], start[0])


@pytest.mark.parametrize("faults", [(None, None), (8, 24)], ids=["clean", "spike-then-inf"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_learned_lr_in_a_plain_torch_loop_matches_the_meta_training_unroll(optimizer: str, faults) -> None:
    """The same frozen controller on the same task and batches gives the same LR trajectory in both places,
    also through a loss spike (the guardrail cuts the LR) and an inf gradient (the run turns non-finite)."""
    controller = _random_controller(seed=2).float().requires_grad_(False)
    spec = create_spec("wine_mlp", steps=30, optimizer=optimizer).replace(base_lr=0.01)
    run = start_run(_with_faults(build_task(spec), *faults), controller)
    unrolled = unroll(controller, run, spec.steps, differentiable=False)

    task = _with_faults(build_task(spec), *faults)
    optimizer_ = make_torch_optimizer(spec.optimizer, task.model.parameters(), spec.base_lr)
    sched = LearnedLR(optimizer_, controller, total_steps=spec.steps)
    stream = task.batches("train")
    deployed, guard = [], []
    for _ in range(spec.steps):
        deployed.append(sched.get_last_lr()[0])
        loss = task.loss(task.model, next(stream))
        loss.backward()
        optimizer_.step()
        sched.step(loss)
        optimizer_.zero_grad()
        guard.append(sched.guard_triggered)
    assert len(set(round(x, 8) for x in deployed)) > 3, "the controller must actually move the LR"
    torch.testing.assert_close(torch.tensor(deployed), torch.tensor(unrolled.lrs), rtol=1e-4, atol=0)
    if faults[0] is not None:
        assert guard[faults[0]] and guard[faults[1]], "both faults must trip the guardrail"
        assert deployed[faults[0] + 1] < deployed[faults[0]] / 5, "the guard cut the LR after the spike"
        assert unrolled.alarms >= 2


def _tiny_config(**meta: object) -> MetaTrainConfig:
    return build_config(
        MetaTrainConfig,
        {
            "name": "tiny",
            "seed": 7,
            "meta": {"meta_steps": 4, "meta_batch": 2, "unroll_length": 5, "checkpoint_every": 0, "log_every": 2, **meta},
        },
    )


def test_same_seed_and_config_give_a_bit_identical_controller(tmp_path) -> None:
    first = meta_train(_tiny_config(), tmp_path / "a", progress=False)
    second = meta_train(_tiny_config(), tmp_path / "b", progress=False)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    saved = load_controller(tmp_path / "a" / "final.safetensors").state_dict()  # the file holds that controller
    assert saved.keys() == first.state_dict().keys() and all(torch.equal(saved[n], t) for n, t in first.state_dict().items())


@pytest.mark.slow
def test_meta_training_lowers_the_meta_objective_on_held_out_tasks(tmp_path) -> None:
    """A few minutes of meta-training beats the untrained controller (= constant LR) on unseen tasks
    sampled from the same families, at full horizon (fixed seeds)."""
    config = build_config(
        MetaTrainConfig,
        {
            "name": "improve",
            "seed": 0,
            "suite": "embedded",
            "meta": {"meta_steps": 60, "meta_batch": 4, "unroll_length": 20, "meta_lr": 3e-3, "checkpoint_every": 0},
        },
    )
    from metalr.config import FamilyEntry

    families = (FamilyEntry("digits_mlp", {"steps": [150, 150]}), FamilyEntry("noisy_quadratic", {"steps": [150, 150]}))
    held_out = sample_specs(families, per_family=3, seed=999)  # seeds never drawn by the trainer's sampler
    untrained = build_controller(config.controller)
    before = meta_validate(untrained, held_out)
    trained = meta_train(config, tmp_path, progress=False)
    after = meta_validate(trained, held_out)
    assert after < before - 0.02, (before, after)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_meta_gradient_is_finite_where_a_gradient_is_exactly_zero(optimizer: str) -> None:
    # A dead ReLU unit (or an embedding row no batch has used) has gradient exactly 0, so Adam's v is 0 and
    # d sqrt(v)/dv is infinite: the meta-gradient became NaN on MNIST CNN tasks (3 of 3 tried) with Adam.
    from metalr.meta.inner import INNER_OPTIMIZERS, InnerHyper

    log_lr = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    inner = INNER_OPTIMIZERS[optimizer](InnerHyper())
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 2, generator=generator, dtype=torch.float64)  # positive inputs
    y = torch.randn(8, 1, generator=generator, dtype=torch.float64)
    w1 = torch.tensor([[1.0, 0.5, -1.0], [0.3, 1.0, -2.0]], dtype=torch.float64)  # hidden unit 2 is dead
    w2 = torch.randn(3, 1, generator=generator, dtype=torch.float64)
    params: tuple[torch.Tensor, ...] = (w1.requires_grad_(), w2.requires_grad_())
    state = inner.init(params)

    def loss(p: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return ((torch.relu(x @ p[0]) @ p[1] - y) ** 2).mean()  # w2's row 2 gets gradient exactly 0

    for _ in range(3):
        grads = torch.autograd.grad(loss(params), params, create_graph=True)
        params, state = inner.update(grads, state, params, log_lr.exp())
    (meta_grad,) = torch.autograd.grad(loss(params), log_lr)
    assert torch.isfinite(meta_grad) and meta_grad != 0
