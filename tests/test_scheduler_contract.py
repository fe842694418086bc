"""``LearnedLR`` against the generic properties PyTorch's ``test/optim/test_lrscheduler.py`` checks of every
scheduler, the warnings a user needs, both resume orders, and the deployment memory contract (feature format 2:
one parameter-sized buffer, held in the optimizer's state; the scheduler's ``state_dict`` holds scalars)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from scheduler_support import train
from torch import nn

from metalr import LRController, PolicyConfig
from metalr.scheduler import UPDATE_KEY, LearnedLR


def active_controller(seed: int = 0) -> LRController:
    controller = LRController(policy=PolicyConfig(base_schedule="cosine"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controller.net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return controller.requires_grad_(False)


def model_and_data(seed: int = 0, steps: int = 16) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)) for _ in range(steps)]
    return model, data


def messages(record: list[warnings.WarningMessage]) -> str:
    return " | ".join(str(w.message) for w in record)


# -- the two warnings torch's schedulers give --------------------------------------------------------------


def test_warns_when_step_comes_before_optimizer_step() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    with pytest.warns(UserWarning, match=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"):
        sched.step(torch.tensor(1.0))


def test_warns_when_optimizer_step_was_overridden() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    optimizer.step = lambda closure=None: None  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match=r"optimizer.step\(\)` has been overridden"):
        sched.step(torch.tensor(1.0))


def test_correct_use_warns_nothing() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = LearnedLR(optimizer, active_controller(), total_steps=len(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, sched, data)


# -- the warnings for silent mistakes -------------------------------------------------------------------------


def test_warns_once_when_optimizer_steps_without_any_gradient() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    with pytest.warns(UserWarning, match=r"every parameter's .grad was None") as record:
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            sched.step(torch.tensor(1.0))
    assert sum("grad was None" in str(w.message) for w in record) == 1


def test_zero_grad_before_sched_step_no_longer_matters() -> None:
    """The gradient is read inside optimizer.step (hooks), so zero_grad() before sched.step(loss) is harmless."""
    model, data = model_and_data()
    reference_model = copy.deepcopy(model)
    a = torch.optim.SGD(model.parameters(), lr=0.1)
    b = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    sched_a = LearnedLR(a, active_controller(), total_steps=len(data))
    sched_b = LearnedLR(b, active_controller(), total_steps=len(data))
    lrs_a, lrs_b = [], []
    for x, y in data:
        for net, opt, sched, lrs, early in ((model, a, sched_a, lrs_a, True), (reference_model, b, sched_b, lrs_b, False)):
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            if early:
                opt.zero_grad()
            sched.step(loss)
            opt.zero_grad()
            lrs.append(opt.param_groups[0]["lr"])
    assert lrs_a == lrs_b


def test_warns_when_stepped_past_total_steps() -> None:
    model, data = model_and_data(steps=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=4)
    with pytest.warns(UserWarning, match=r"stepped past total_steps=4") as record:
        train(model, optimizer, sched, data)
    assert sum("past total_steps" in str(w.message) for w in record) == 1


def test_warns_when_parameters_turn_non_finite() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    x, y = data[0]
    with pytest.warns(UserWarning, match=r"parameters are no longer finite after optimizer step 1"):
        loss = nn.functional.mse_loss(model(x), y) * float("inf")
        loss.backward()
        optimizer.step()
        sched.step(loss)


def test_the_warning_points_at_the_users_line() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    with pytest.warns(UserWarning) as record:
        sched.step(torch.tensor(1.0))
    assert record[0].filename == __file__


# -- add_param_group -------------------------------------------------------------------------------------------


def test_add_param_group_gives_the_new_group_its_lr_and_training_continues() -> None:
    model, data = model_and_data()
    head = nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = LearnedLR(optimizer, active_controller(), total_steps=100)  # far from the end: no LR at min_lr
    train(model, optimizer, sched, data[:4])
    optimizer.add_param_group({"params": head.parameters(), "lr": 1e-3})
    for x, y in data[4:]:
        loss = nn.functional.mse_loss(head(model(x)), y)
        loss.backward()
        optimizer.step()
        sched.step(loss)
        optimizer.zero_grad()
        lr_a, lr_b = sched.get_last_lr()
        assert lr_a / lr_b == pytest.approx(10.0, rel=1e-9), "each group keeps its own scale"
    assert sched.last_epoch == len(data) and min(sched.get_last_lr()) > sched.controller.policy.min_lr
    assert UPDATE_KEY in optimizer.state[next(head.parameters())], "the new group's update is tracked too"


def test_removed_param_groups_are_a_clear_error_that_changes_nothing() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    optimizer.param_groups.pop()
    before = (sched.last_epoch, list(sched.get_last_lr()), optimizer.param_groups[0]["lr"])
    with pytest.raises(ValueError, match=r"has 1 param groups, fewer than the 2 LearnedLR was built for"):
        sched.step(torch.tensor(1.0))
    assert (sched.last_epoch, list(sched.get_last_lr()), optimizer.param_groups[0]["lr"]) == before


# -- resume: both orders exact ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["optimizer-first", "scheduler-first"])
@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_resume_is_exact_in_both_restore_orders(order: str, kind: str) -> None:
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
        "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }[kind]
    model, data = model_and_data(steps=20)
    optimizer = make(model.parameters())
    sched = LearnedLR(optimizer, active_controller(), total_steps=20)
    train(model, optimizer, sched, data[:8])
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), sched.state_dict()))
    reference = train(model, optimizer, sched, data[8:])

    model2, _ = model_and_data(seed=3)
    model2.load_state_dict(saved[0])
    optimizer2 = make(model2.parameters())
    if order == "optimizer-first":
        optimizer2.load_state_dict(saved[1])
        sched2 = LearnedLR(optimizer2, active_controller(), total_steps=999)
    else:
        sched2 = LearnedLR(optimizer2, active_controller(), total_steps=999)
        optimizer2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert optimizer2.param_groups[0]["lr"] == saved[2]["_last_lr"][0], "the first resumed step runs at the saved LR"
    assert train(model2, optimizer2, sched2, data[8:]) == reference


# -- memory: one buffer, in the optimizer's state; a scalar state_dict ------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_scheduler_holds_at_most_one_parameter_sized_buffer_and_a_scalar_state_dict(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), 1e-3) if kind == "adam" else torch.optim.SGD(model.parameters(), 0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        sched.step(loss)
        optimizer.zero_grad()
    buffers = sum(optimizer.state[p][UPDATE_KEY].numel() * 4 for p in model.parameters())
    assert buffers == param_bytes, "the previous update: exactly one parameter-sized buffer"
    held = sched.held_tensor_bytes()
    assert param_bytes <= held < 1.01 * param_bytes, f"held {held} bytes for {param_bytes} bytes of parameters"
    own = {k: v for k, v in vars(sched).items() if k not in ("optimizer", "controller", "_hooked", "_hooks")}
    stray = [k for k, v in own.items() if isinstance(v, torch.Tensor) and v.numel() > 3]
    assert not stray, f"parameter-sized tensors on the scheduler itself: {stray}"
    state = sched.state_dict()
    tensors = [t for t in state["feature_state"].values()] + [state["log_factor"], state["hidden"]]
    assert max(t.numel() for t in tensors) <= 3, "state_dict holds scalars only"


def test_tensor_learning_rates_come_back_as_tensors() -> None:
    model, data = model_and_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2))
    sched = LearnedLR(optimizer, active_controller(), total_steps=len(data))
    train(model, optimizer, sched, data[:3])
    (last,) = sched.get_last_lr()
    assert isinstance(last, torch.Tensor)
    assert float(last) == pytest.approx(float(optimizer.param_groups[0]["lr"]))
    assert last is not optimizer.param_groups[0]["lr"], "a copy, as torch's schedulers return"


# -- the default controller, and a controller of another family ------------------------------------------------


@pytest.fixture
def shipped_families(tmp_path, monkeypatch) -> None:
    from metalr.checkpoint import save_controller

    for name, family in (("adam-x", "adam"), ("sgd-x", "sgd")):
        save_controller(active_controller(), tmp_path / f"{name}.safetensors", optimizer_family=family)
    monkeypatch.setenv("METALR_CHECKPOINTS", str(tmp_path))


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: torch.optim.Adam(p, lr=1e-3), "adam-x"),
        (lambda p: torch.optim.AdamW(p, lr=1e-3), "adam-x"),
        (lambda p: torch.optim.SGD(p, lr=0.1), "sgd-x"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "sgd-x"),
    ],
)
def test_without_a_controller_the_shipped_one_of_the_optimizers_family_is_used(shipped_families, make, expected) -> None:
    model, data = model_and_data()
    optimizer = make(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = LearnedLR(optimizer, total_steps=len(data))
        train(model, optimizer, sched, data[:3])
    assert sched.controller.source_path.endswith(f"{expected}.safetensors")


def test_a_controller_of_another_family_warns(shipped_families) -> None:
    model, _ = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"meta-trained for 'adam' optimizers, but it is driving SGD \('sgd'\)"):
        LearnedLR(optimizer, "adam-x", total_steps=10)


def test_an_optimizer_of_no_known_family_without_a_controller_is_a_clear_error(shipped_families) -> None:
    model, _ = model_and_data()
    with pytest.raises(ValueError, match=r"Adagrad"):
        LearnedLR(torch.optim.Adagrad(model.parameters(), lr=0.1), total_steps=10)
