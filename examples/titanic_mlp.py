"""Titanic survival with an MLP (Adam), its learning rate set every step by a meta-learned controller.

    python examples/titanic_mlp.py --data-dir ../shared/data      # or METALR_DATA_DIR=../shared/data

Reads Kaggle's ``titanic/train.csv``; 20% of the passengers (fixed seed) are held out for accuracy.
"""

import argparse
import csv
import math
import os

import torch
from _data import data_files  # examples/_data.py: where data is looked for
from torch import nn

from metalr import LearnedLR, load_controller

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default=os.environ.get("METALR_DATA_DIR", "data"))
parser.add_argument("--controller", default="adam-cpu", help="shipped controller name or .safetensors path")
parser.add_argument("--epochs", type=int, default=60)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=3e-3, help="base LR the controller scales")
args = parser.parse_args()
torch.manual_seed(0)

with open(data_files(args.data_dir, "titanic", "train.csv") / "train.csv", newline="") as f:
    rows = list(csv.DictReader(f))
ages = sorted(float(r["Age"]) for r in rows if r["Age"])
median_age = ages[len(ages) // 2]  # missing ages (177 of 891) get the median


def encode(r: dict) -> list[float]:
    age = float(r["Age"]) if r["Age"] else median_age
    embarked = [float(r["Embarked"] == port) for port in "CQS"]
    return [float(r["Pclass"]), float(r["Sex"] == "female"), age, float(r["SibSp"]), float(r["Parch"]),
            math.log1p(float(r["Fare"] or 0)), float(not r["Age"]), *embarked]  # fmt: skip


x = torch.tensor([encode(r) for r in rows])
y = torch.tensor([float(r["Survived"]) for r in rows])
order = torch.randperm(len(x))
train, test = order[: int(0.8 * len(x))], order[int(0.8 * len(x)) :]
mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
x = (x - mean) / std  # standardise with training statistics only

model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
steps_per_epoch = math.ceil(len(train) / args.batch_size)
sched = LearnedLR(optimizer, load_controller(args.controller), total_steps=args.epochs * steps_per_epoch)

for epoch in range(args.epochs):
    for idx in train[torch.randperm(len(train))].split(args.batch_size):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), y[idx])
        loss.backward()
        optimizer.step()
        sched.step(loss)  # after optimizer.step() (whose hooks read the gradient and the update): the loss
        optimizer.zero_grad()
    if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
        with torch.no_grad():
            accuracy = ((model(x[test]).squeeze(1) > 0).float() == y[test]).float().mean().item()
        print(
            f"epoch {epoch + 1}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  test accuracy {accuracy:.3f}"
        )
