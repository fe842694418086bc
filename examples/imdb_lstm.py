"""IMDB sentiment with an LSTM (Adam, gradient clipping), its LR set every step by a meta-learned controller.

    python examples/imdb_lstm.py --data-dir ../shared/data        # or METALR_DATA_DIR=../shared/data

Reads ``imdb/aclImdb_v1_labeled.tar.gz`` (the original aclImdb tree) without unpacking it.
"""

import argparse
import os
import re
import tarfile
from collections import Counter

import torch
from _data import data_files  # examples/_data.py: where data is looked for
from torch import nn

from metalr import LearnedLR, load_controller

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default=os.environ.get("METALR_DATA_DIR", "data"))
parser.add_argument("--controller", default="adam-cpu", help="shipped controller name or .safetensors path")
parser.add_argument("--steps", type=int, default=600, help="optimizer steps (batches of --batch-size)")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=2e-3, help="base LR the controller scales")
args = parser.parse_args()
torch.manual_seed(0)

texts: dict[str, list[tuple[list[str], int]]] = {"train": [], "test": []}
with tarfile.open(data_files(args.data_dir, "imdb", "aclImdb_v1_labeled.tar.gz") / "aclImdb_v1_labeled.tar.gz") as tar:
    for member in tar:  # aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt
        parts = member.name.split("/")
        if len(parts) == 4 and parts[2] in ("pos", "neg") and parts[3].endswith(".txt"):
            text = tar.extractfile(member).read().decode().lower().replace("<br />", " ")
            texts[parts[1]].append((re.findall(r"[a-z']+", text), int(parts[2] == "pos")))
vocab = {
    w: i + 2 for i, (w, _) in enumerate(Counter(w for ws, _ in texts["train"] for w in ws).most_common(20000))
}


def tensors(split: str, length: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [[vocab.get(w, 1) for w in ws[:length]] + [0] * max(0, length - len(ws)) for ws, _ in texts[split]]
    return torch.tensor(ids), torch.tensor([label for _, label in texts[split]])


embed, lstm, head = (
    nn.Embedding(len(vocab) + 2, 64, padding_idx=0),
    nn.LSTM(64, 64, batch_first=True),
    nn.Linear(64, 2),
)
model = nn.ModuleList([embed, lstm, head])


def classify(ids: torch.Tensor) -> torch.Tensor:
    out, _ = lstm(embed(ids))
    mask = (ids > 0).unsqueeze(-1).float()  # mean over real tokens, not padding
    return head((out * mask).sum(1) / mask.sum(1).clamp_min(1))


(x_train, y_train), (x_test, y_test) = tensors("train"), tensors("test")
optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
sched = LearnedLR(optimizer, load_controller(args.controller), total_steps=args.steps)
for step in range(args.steps):
    idx = torch.randint(len(x_train), (args.batch_size,))
    loss = nn.functional.cross_entropy(classify(x_train[idx]), y_train[idx])
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # LearnedLR then reads the clipped (applied) gradient
    optimizer.step()
    sched.step(loss)
    optimizer.zero_grad()
    if (step + 1) % 100 == 0 or step + 1 == args.steps:
        print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
with torch.no_grad():
    sample = torch.randperm(len(x_test))[:5000]  # a fixed-seed 5,000-review sample keeps evaluation quick
    accuracy = (classify(x_test[sample]).argmax(1) == y_test[sample]).float().mean().item()
print(f"test accuracy (5,000 reviews) {accuracy:.4f}")
