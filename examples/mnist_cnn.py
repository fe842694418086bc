"""MNIST with a small CNN, its learning rate set every step by a meta-learned controller.

    python examples/mnist_cnn.py --data-dir ../shared/data        # or METALR_DATA_DIR=../shared/data
    python examples/mnist_cnn.py --controller checkpoints/demo.safetensors --epochs 2

Reads the original IDX files (``mnist/train-images-idx3-ubyte.gz`` ...) under the data directory.
"""

import argparse
import gzip
import os
from pathlib import Path

import numpy as np
import torch
from _data import data_files  # examples/_data.py: where data is looked for
from torch import nn

from metalr import LearnedLR, load_controller


def read_idx(path: Path) -> torch.Tensor:
    """IDX: 2 zero bytes, a dtype byte, the number of dims, big-endian uint32 sizes, then raw uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    shape = np.frombuffer(raw, ">u4", count=raw[3], offset=4)
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(shape).copy())


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-dir", default=os.environ.get("METALR_DATA_DIR", "data"))
parser.add_argument("--controller", default="sgd-cpu", help="shipped controller name or .safetensors path")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--lr", type=float, default=0.05, help="base LR the controller scales")
parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
args = parser.parse_args()
torch.manual_seed(0)

files = [f"{split}-{kind}-idx{dims}-ubyte.gz" for split in ("train", "t10k") for kind, dims in (("images", 3), ("labels", 1))]
root = data_files(args.data_dir, "mnist", *files)
load = lambda split: (read_idx(root / f"{split}-images-idx3-ubyte.gz").float().div(255).unsqueeze(1),  # noqa: E731
                      read_idx(root / f"{split}-labels-idx1-ubyte.gz").long())  # fmt: skip
(x_train, y_train), (x_test, y_test) = load("train"), load("t10k")
model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
    nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
)  # fmt: skip
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
steps_per_epoch = len(x_train) // args.batch_size
total = min(args.epochs * steps_per_epoch, args.max_steps or 1 << 62)
sched = LearnedLR(optimizer, load_controller(args.controller), total_steps=total)

for step in range(total):
    if step % steps_per_epoch == 0:
        order = torch.randperm(len(x_train))
    idx = order[(step % steps_per_epoch) * args.batch_size :][: args.batch_size]
    loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
    loss.backward()
    optimizer.step()
    sched.step(loss)  # after optimizer.step() (whose hooks read the gradient and the update): the loss
    optimizer.zero_grad()
    if (step + 1) % 200 == 0 or step + 1 == total:
        print(f"step {step + 1}/{total}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")

with torch.no_grad():
    predictions = torch.cat([model(batch).argmax(1) for batch in x_test.split(1000)])
accuracy = (predictions == y_test).float().mean().item()
print(f"test accuracy {accuracy:.4f}")
