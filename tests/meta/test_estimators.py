"""Reference checks of the meta-gradient estimators and truncation schedules.

The key check (issue 5): on a float64 problem whose true full-horizon meta-gradient is computed by
backprop through the whole unroll, PES summed over the truncations is unbiased, while truncated backprop
(and truncated ES) are measurably biased (short-horizon bias, Wu et al., ICLR 2018; Vicol et al., 2021).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from metalr.config import MetaConfig
from metalr.controller import ArchConfig, LRController, PolicyConfig
from metalr.features import FeatureSpec
from metalr.meta.estimators import EstimatorError, create_estimator
from metalr.meta.recipe import load_recipe
from metalr.meta.truncation import make_truncation_schedule
from metalr.meta.unroll import InnerRun, Objective, start_run, unroll, unroll_population
from metalr.tasks import TaskSpec, build_task, create_task_family

HORIZON, TRUNCATION = 40, 5


def _quadratic(steps: int = HORIZON, optimizer: str = "sgd", base_lr: float = 0.5) -> TaskSpec:
    return TaskSpec(
        family="noisy_quadratic",
        seed=3,
        optimizer=optimizer,
        base_lr=base_lr,
        steps=steps,
        batch_size=8,
        options={"dim": 8, "condition": 30.0, "noise": 0.1},
    )


def _schedule_controller(bias: float = -0.3) -> LRController:
    """Only the head bias b is trainable: the LR is base_lr * exp(0.1 t tanh(b)), an exponential schedule
    with one meta-parameter, so a few hundred ES perturbations estimate its gradient well."""
    torch.manual_seed(0)
    controller = LRController(
        FeatureSpec(groups=("progress",)), PolicyConfig(guard_cut=1.0), ArchConfig(hidden=(4,))
    )
    controller = controller.double()
    for name, p in controller.named_parameters():
        p.requires_grad_(name == "net.head.bias")
    with torch.no_grad():
        controller.net.head.bias.fill_(bias)
    return controller


def _fresh(controller: LRController, spec: TaskSpec | None = None) -> InnerRun:
    return start_run(build_task(spec or _quadratic()), controller, valid_batch_size=16, dtype=torch.float64)


def _bias_index(controller: LRController) -> int:
    return [n for n, _ in controller.named_parameters()].index("net.head.bias")


def _summed_over_horizon(controller: LRController, estimator: str, seed: int = 0, pairs: int = 1) -> float:
    """Sum of one estimator's per-truncation estimates over the whole horizon (state carried)."""
    est = create_estimator(MetaConfig(estimator=estimator, es_pairs=pairs, es_sigma=0.01))
    run, total, truncation = _fresh(controller), 0.0, 0
    state = est.init(controller, run)
    while not run.done:
        estimate = est(controller, run, TRUNCATION, seed=seed * 1000 + truncation, state=state)
        total += float(estimate.grads[_bias_index(controller)])
        run, state, truncation = estimate.run, estimate.state, truncation + 1
    assert truncation == HORIZON // TRUNCATION
    return total


def _true_gradient(controller: LRController) -> float:
    # The objective the truncations estimate: the sum of per-truncation means = (T / K) x full-horizon mean.
    full = unroll(controller, _fresh(controller), HORIZON, differentiable=True).meta_loss * (
        HORIZON / TRUNCATION
    )
    return float(torch.autograd.grad(full, [controller.net.head.bias])[0])


@pytest.mark.slow
def test_pes_is_unbiased_over_the_horizon_where_truncated_estimators_are_biased() -> None:
    controller = _schedule_controller()
    true = _true_gradient(controller)
    tbptt = _summed_over_horizon(controller, "tbptt")
    pes = [_summed_over_horizon(controller, "pes", seed=s, pairs=20) for s in range(6)]
    es = [_summed_over_horizon(controller, "es", seed=s, pairs=20) for s in range(2)]
    pes_mean = statistics.fmean(pes)
    pes_stderr = statistics.stdev(pes) / math.sqrt(len(pes))
    # Truncated backprop sees only the last K steps of each LR decision: far off the true gradient.
    assert abs(tbptt - true) > 0.5 * abs(true), (tbptt, true)
    # Truncated ES estimates the same truncated (biased) gradient as TBPTT, not the true one.
    assert abs(statistics.fmean(es) - tbptt) < 0.3 * abs(tbptt), (es, tbptt)
    assert abs(statistics.fmean(es) - true) > 0.5 * abs(true)
    # PES: within sampling error of the true full-horizon gradient.
    assert abs(pes_mean - true) < max(4 * pes_stderr, 0.15 * abs(true)), (pes, true)
    assert abs(pes_mean - true) < 0.25 * abs(true), (pes_mean, true)


def test_full_backprop_is_the_gradient_of_the_whole_unroll() -> None:
    controller = _schedule_controller()
    spec = _quadratic(steps=12)
    estimate = create_estimator(MetaConfig(estimator="full"))(controller, _fresh(controller, spec), 3)
    assert estimate.run.done and estimate.steps == 12
    whole = unroll(controller, _fresh(controller, spec), 12, differentiable=True).meta_loss
    expected = torch.autograd.grad(whole, [controller.net.head.bias])[0]
    torch.testing.assert_close(estimate.grads[_bias_index(controller)], expected, rtol=1e-12, atol=0)
    # Frozen parameters get an exact zero, not a missing entry.
    assert all(
        float(g.abs().sum()) == 0
        for (n, _), g in zip(controller.named_parameters(), estimate.grads, strict=True)
        if n != "net.head.bias"
    )


def test_full_backprop_refuses_horizons_above_the_limit() -> None:
    controller = _schedule_controller()
    estimator = create_estimator(MetaConfig(estimator="full", max_full_horizon=20))
    with pytest.raises(EstimatorError, match=r"40 steps > meta.max_full_horizon=20"):
        estimator(controller, _fresh(controller), 5)


def test_es_and_pes_leave_the_run_untouched_and_are_deterministic_in_the_seed() -> None:
    controller = _schedule_controller()
    run = _fresh(controller)
    position = run.train_stream.position
    for name in ("es", "pes"):
        estimator = create_estimator(MetaConfig(estimator=name, es_pairs=2))
        first = estimator(controller, run, TRUNCATION, seed=5)
        second = estimator(controller, run, TRUNCATION, seed=5)
        third = estimator(controller, run, TRUNCATION, seed=6)
        assert run.train_stream.position == position and run.step == 0
        assert first.run.step == TRUNCATION and first.run.train_stream.position == position + TRUNCATION
        assert all(torch.equal(a, b) for a, b in zip(first.grads, second.grads, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(first.grads, third.grads, strict=True))
    pes_state = first.state
    assert pes_state.carry.params[0].shape[0] == 4, "2 pairs = 4 particles, stacked"
    assert pes_state.accumulated["head.bias"].shape[0] == 2


def test_pes_particles_persist_and_accumulate_noise() -> None:
    controller = _schedule_controller()
    estimator = create_estimator(MetaConfig(estimator="pes", es_pairs=1, es_sigma=0.1))
    one = estimator(controller, _fresh(controller), TRUNCATION, seed=1)
    two = estimator(controller, one.run, TRUNCATION, seed=2, state=one.state)
    xi1 = one.state.accumulated["head.bias"][0]  # xi of the one trainable parameter
    xi2 = two.state.accumulated["head.bias"][0]
    assert not torch.equal(xi1, xi2)
    # The +/- particles follow different trajectories (their own perturbed controllers).
    plus, minus = two.state.carry.params[0]
    assert not torch.equal(plus, minus)


def _float64_controller() -> LRController:
    """A float64 controller on a cosine base whose head is not zero (so perturbations change its LRs)."""
    torch.manual_seed(0)
    controller = LRController(policy=PolicyConfig(base_schedule="cosine")).double()
    with torch.no_grad():
        controller.net.head.weight.normal_(0, 0.3)
    return controller


def _wine_spec() -> TaskSpec:
    spec = create_task_family("wine_mlp").sample(torch.Generator().manual_seed(2))
    return spec.replace(optimizer="adam", base_lr=1e-2, steps=40)


@pytest.mark.parametrize("name", ["es", "pes"])
def test_vectorised_and_sequential_particles_agree_in_float64(name: str) -> None:
    """One vmap-ed unroll of all particles = the particles unrolled one after another (same noise, same tasks)."""
    controller = _float64_controller()
    spec = _wine_spec()
    results = {}
    for vectorize in (True, False):
        estimator = create_estimator(MetaConfig(estimator=name, es_pairs=3, es_sigma=0.05, vectorize=vectorize))
        run = start_run(build_task(spec), controller, valid_batch_size=32, dtype=torch.float64)
        state = estimator.init(controller, run)
        for truncation in range(2):
            estimate = estimator(controller, run, 10, seed=truncation, state=state)
            run, state = estimate.run, estimate.state
        results[vectorize] = estimate
    vectorised, sequential = results[True], results[False]
    for a, b in zip(vectorised.grads, sequential.grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
    assert abs(vectorised.meta_loss - sequential.meta_loss) < 1e-9
    assert vectorised.lrs == pytest.approx(sequential.lrs, rel=1e-9)
    torch.testing.assert_close(vectorised.run.params, sequential.run.params, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().sum()) > 0 for g in vectorised.grads)


def test_backend_higher_is_refused_for_the_es_estimators() -> None:
    with pytest.raises(EstimatorError, match="backprop estimators"):
        create_estimator(MetaConfig(estimator="pes", backend="higher"))
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'; expected one of"):
        load_recipe(None, ["meta.estimator=reinforce"])  # rejected when the recipe is loaded, before any run starts


def test_truncation_schedules() -> None:
    assert [make_truncation_schedule("constant", 20)(s) for s in range(3)] == [20, 20, 20]
    curriculum = make_truncation_schedule("curriculum", 100, min_length=10, curriculum_steps=50)
    lengths = [curriculum(s) for s in range(0, 80, 10)]
    assert lengths[0] == 10 and lengths[5:] == [100, 100, 100]
    assert lengths == sorted(lengths)
    log_uniform = make_truncation_schedule("log_uniform", 200, min_length=5, seed=1)
    draws = [log_uniform(s) for s in range(300)]
    assert min(draws) >= 5 and max(draws) <= 200
    assert draws == [log_uniform(s) for s in range(300)], "a pure function of the meta-step"
    # Log-uniform: about half the draws below the geometric mean sqrt(5 * 200) = 31.6.
    assert 0.35 < sum(d < 31.6 for d in draws) / len(draws) < 0.65
    with pytest.raises(ValueError, match="unknown truncation schedule"):
        make_truncation_schedule("linear", 10)
    with pytest.raises(ValueError, match="min_length <= max_length"):
        make_truncation_schedule("log_uniform", 10, min_length=20)


def _population(controller: LRController, size: int) -> list[InnerRun]:
    """``size`` wine-MLP tasks of one architecture: different seeds (data order, init) and base LRs."""
    spec = _wine_spec()
    specs = [spec.replace(seed=spec.seed + m, base_lr=spec.base_lr * 2.0**m) for m in range(size)]
    return [start_run(build_task(s), controller, valid_batch_size=32, dtype=torch.float64) for s in specs]


@pytest.mark.parametrize("name", ["es", "pes"])
def test_a_vectorised_population_agrees_with_its_members_estimated_one_by_one_in_float64(name: str) -> None:
    """One vmap over members x particles = every member's particles unrolled one after another."""
    controller = _float64_controller()
    results = {}
    for vectorize in (True, False):
        estimator = create_estimator(MetaConfig(estimator=name, es_pairs=2, es_sigma=0.05, vectorize=vectorize))
        runs = _population(controller, 3)
        states = [estimator.init(controller, r) for r in runs]
        for truncation in range(2):
            estimates = estimator.many(controller, runs, 10, [truncation * 10 + m for m in range(3)], states)
            runs, states = [e.run for e in estimates], [e.state for e in estimates]
        results[vectorize] = estimates
    for vectorised, sequential in zip(results[True], results[False], strict=True):
        for a, b in zip(vectorised.grads, sequential.grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)
        assert abs(vectorised.meta_loss - sequential.meta_loss) < 1e-9
        assert vectorised.lrs == pytest.approx(sequential.lrs, rel=1e-9)
        assert vectorised.alarms == sequential.alarms
        torch.testing.assert_close(vectorised.run.params, sequential.run.params, rtol=1e-9, atol=1e-12)
    # Members are different tasks: their estimates differ (the population is not one task copied).
    first, second = results[True][0], results[True][1]
    assert not torch.allclose(first.grads[-1], second.grads[-1])
    assert first.lrs != pytest.approx(second.lrs)


def test_a_population_unroll_is_its_members_unrolled_alone() -> None:
    controller = LRController(policy=PolicyConfig(base_schedule="cosine")).double()
    runs = _population(controller, 2)
    together = unroll_population(controller, runs, 12, objective=Objective(every=4))
    for run, result in zip(runs, together, strict=True):
        alone = unroll(controller, run, 12, differentiable=False, objective=Objective(every=4))
        assert float(result.meta_loss) == pytest.approx(float(alone.meta_loss), rel=1e-9)
        assert result.lrs == pytest.approx(alone.lrs, rel=1e-9)
        assert result.run.step == alone.run.step == 12
        torch.testing.assert_close(result.run.params, alone.run.params, rtol=1e-9, atol=1e-12)
    assert runs[0].step == 0, "the population's runs are not modified"


def test_a_population_refuses_members_of_different_architectures() -> None:
    controller = LRController(policy=PolicyConfig(base_schedule="cosine")).double()
    runs = _population(controller, 2)
    other = start_run(build_task(_quadratic()), controller, valid_batch_size=32, dtype=torch.float64)
    with pytest.raises(ValueError, match="one architecture in lockstep"):
        unroll_population(controller, [runs[0], other], 5)
    ahead = unroll(controller, runs[1], 3, differentiable=False).run
    with pytest.raises(ValueError, match="one architecture in lockstep"):
        unroll_population(controller, [runs[0], ahead], 5)


def test_objective_cap_scores_a_diverged_run_at_the_cap_instead_of_voiding_its_truncation() -> None:
    torch.manual_seed(0)
    controller = LRController(
        FeatureSpec(groups=("progress",)), PolicyConfig(guard_cut=1.0, max_lr=100.0), ArchConfig(hidden=(4,))
    )
    diverging = start_run(build_task(_quadratic(base_lr=50.0)), controller, valid_batch_size=16)  # float32
    raw = unroll(controller, diverging, HORIZON, differentiable=False)
    capped = unroll(controller, diverging, HORIZON, differentiable=False, objective=Objective(cap=1.0))
    assert not math.isfinite(float(raw.meta_loss)), "the fixture must diverge past float32's range"
    assert math.isfinite(float(capped.meta_loss)) and 0.0 < float(capped.meta_loss) <= 1.0
    stable = _fresh(controller.double())  # converges: a cap above every term changes nothing, one below lowers it
    plain = unroll(controller, stable, HORIZON, differentiable=False)
    assert float(unroll(controller, stable, HORIZON, differentiable=False, objective=Objective(cap=50.0)).meta_loss) == float(plain.meta_loss)
    assert float(unroll(controller, stable, HORIZON, differentiable=False, objective=Objective(cap=-1.0)).meta_loss) < float(plain.meta_loss)
    controller.float()
    for cap, finite in ((None, False), (1.0, True)):
        pes = create_estimator(MetaConfig(estimator="pes", es_pairs=2, objective_cap=cap))
        estimate = pes(controller, diverging, HORIZON, seed=0)
        assert math.isfinite(estimate.meta_loss) is finite
        assert all(bool(torch.isfinite(g).all()) for g in estimate.grads) is finite
    solved = _fresh(controller.double())  # a loss of exactly 0 is not a divergence: -inf, not the cap
    loss = solved.task.loss
    object.__setattr__(solved.task, "loss", lambda output, batch: 0.0 * loss(output, batch))
    assert float(unroll(controller, solved, 1, differentiable=False, objective=Objective(cap=1.0)).meta_loss) == -math.inf
    controller.float()
    with pytest.raises(EstimatorError, match="objective_cap applies to the ES/PES estimators"):
        create_estimator(MetaConfig(estimator="tbptt", objective_cap=1.0))
    with pytest.raises(ValueError, match="objective_cap must be a finite number or null"):
        MetaConfig(estimator="pes", objective_cap=float("inf"))


def test_objective_power_weights_each_term_by_its_progress_after_the_cap() -> None:
    torch.manual_seed(0)
    controller = _schedule_controller().double()
    run = _fresh(controller)
    steps = run.task.spec.steps

    def terms(power: float, cap: float | None = None) -> list[float]:  # one term per step, step by step
        values, current = [], run
        for _ in range(steps):
            result = unroll(
                controller, current, 1, differentiable=False, objective=Objective(cap=cap, power=power)
            )
            values.append(float(result.meta_loss))
            current = result.run
        return values

    plain, weighted = terms(0.0), terms(3.0)
    for t, (p, w) in enumerate(zip(plain, weighted, strict=True), start=1):
        assert w == pytest.approx(4 * (t / steps) ** 3 * p, rel=1e-9)
    whole = unroll(controller, run, steps, differentiable=False, objective=Objective(power=3.0))
    assert float(whole.meta_loss) == pytest.approx(sum(weighted) / steps, rel=1e-9)
    assert float(unroll(controller, run, steps, differentiable=False, objective=Objective(power=0.0)).meta_loss) == float(
        unroll(controller, run, steps, differentiable=False).meta_loss
    ), "power 0 is the unweighted objective, bit for bit"
    cap = sorted(plain)[steps // 2]  # the cap clamps the raw term, then the weight applies
    for t, (p, w) in enumerate(zip(plain, terms(3.0, cap), strict=True), start=1):
        assert w == pytest.approx(4 * (t / steps) ** 3 * min(p, cap), rel=1e-9)
    with pytest.raises(ValueError, match="objective_power must be a finite number >= 0"):
        MetaConfig(objective_power=-1.0)
