"""``LearnedLRCallback`` in a real ``transformers.Trainer`` run on a tiny from-config model (offline).

Checks that the controller steps once per optimizer step, with that step's loss (the number Trainer logs)
and that step's gradients still on the parameters, under gradient accumulation, and that the LR Trainer
applies is the one LearnedLR wrote.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from metalr import LRController  # noqa: E402
from metalr.integrations.hf import LearnedLRCallback  # noqa: E402
from metalr.scheduler import LearnedLR  # noqa: E402


class TinyTextDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, length: int = 12, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=generator)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def active_controller() -> LRController:
    controller = LRController()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in controller.net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return controller.requires_grad_(False)


class Spy(TrainerCallback):
    """Records Trainer's logged per-step loss and gradient norm, and the LR used by each optimizer step."""

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.lr_used: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lr_used.append(optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logged.append(dict(logs))


def spy_on_scheduler(sched: LearnedLR) -> list[tuple[float, float]]:
    """Wrap ``_observe`` to record (loss, global grad norm at that moment) for every observed step."""
    seen: list[tuple[float, float]] = []
    observe = sched._observe

    def recording(loss: torch.Tensor) -> None:
        grads = [p.grad for p in sched._params if p.grad is not None]
        norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if grads
            else 0.0
        )
        seen.append((float(loss), norm))
        observe(loss)

    sched._observe = recording  # type: ignore[method-assign]
    return seen


def make_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        max_grad_norm=1e9, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(**settings)


def test_trainer_builds_learned_lr_and_feeds_each_steps_loss_and_gradients(tmp_path) -> None:
    spy = Spy()
    trainer = Trainer(
        model=tiny_bert(), args=make_args(tmp_path), train_dataset=TinyTextDataset(), callbacks=[spy]
    )
    callback = LearnedLRCallback(active_controller()).attach(trainer)
    original_create = trainer.create_scheduler
    observed: dict[str, list[tuple[float, float]]] = {}

    def create_and_spy(num_training_steps, optimizer=None):
        sched = original_create(num_training_steps, optimizer)
        observed["seen"] = spy_on_scheduler(sched)
        return sched

    trainer.create_scheduler = create_and_spy  # type: ignore[method-assign]
    trainer.train()

    sched = trainer.lr_scheduler
    assert isinstance(sched, LearnedLR) and callback.scheduler is sched
    assert sched.total_steps == 6 and sched.last_epoch == 6
    seen = observed["seen"]
    assert len(seen) == 6 == len(spy.logged)  # once per optimizer step, not per micro-batch
    for (loss, grad_norm), logs in zip(seen, spy.logged, strict=True):
        assert loss == pytest.approx(logs["loss"], rel=1e-6)
        assert grad_norm == pytest.approx(logs["grad_norm"], rel=1e-4) and grad_norm > 0
    # Every optimizer step used the LR LearnedLR wrote (step 0: the base LR), and Trainer logs that LR.
    assert spy.lr_used[0] == pytest.approx(1e-3)
    assert spy.lr_used == [row["learning_rate"] for row in spy.logged]
    assert len(set(spy.lr_used)) > 1, "the active controller should move the LR"
    assert sched.get_last_lr()[0] == trainer.optimizer.param_groups[0]["lr"]


def test_user_built_learned_lr_through_optimizers_argument(tmp_path) -> None:
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = LearnedLR(optimizer, active_controller(), total_steps=4)
    seen = spy_on_scheduler(sched)
    trainer = Trainer(
        model=model, args=make_args(tmp_path, max_steps=4, gradient_accumulation_steps=1),
        train_dataset=TinyTextDataset(), optimizers=(optimizer, sched),
    )  # fmt: skip
    LearnedLRCallback().attach(trainer)
    trainer.train()
    assert trainer.lr_scheduler is sched and sched.last_epoch == 4
    assert len(seen) == 4 and all(loss > 0 for loss, _ in seen)
    assert "no_loss" not in sched._warned


def test_attach_refuses_what_it_cannot_drive(tmp_path) -> None:
    model = tiny_bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    trainer = Trainer(
        model=model, args=make_args(tmp_path), train_dataset=TinyTextDataset(), optimizers=(optimizer, cosine)
    )
    with pytest.raises(ValueError, match="CosineAnnealingLR"):
        LearnedLRCallback(active_controller()).attach(trainer)
    plain = Trainer(model=tiny_bert(), args=make_args(tmp_path), train_dataset=TinyTextDataset())
    with pytest.raises(ValueError, match="needs a controller"):
        LearnedLRCallback().attach(plain)
    forgotten = Trainer(
        model=tiny_bert(), args=make_args(tmp_path), train_dataset=TinyTextDataset(),
        callbacks=[LearnedLRCallback(active_controller())],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="attach"):
        forgotten.train()
