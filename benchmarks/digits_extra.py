"""A digits stand-in for the DM-AT generated data: new images made from the training split and
labelled by a classifier, written as the .npz `weat train --extra-data` maps.

The DM-AT works train on millions of images from a class-conditional diffusion model (Wang et al.
2023) or pseudo-labelled outside images (Carmon et al. 2019). For the bundled digits set (1,437
training images of 16x16) this script makes the offline, seconds-long equivalent: each new image is
a training image under a random affine warp (rotation +-15 degrees, scale 0.85-1.15, shear +-10
degrees, shift +-1.5 pixels, bilinear) plus Gaussian pixel noise (std 6/255), and its label is a
teacher's prediction (pseudo-labelling, as Carmon et al. label their images), not the source
image's label. The teacher is a standard (non-robust) digits model trained on the training split
only, so no test image is involved. The file also keeps `source_label` (ignored by weat) to report
how often teacher and source agree.

    python benchmarks/digits_extra.py --out runs/digits-extra.npz            # trains the teacher first
    python benchmarks/digits_extra.py --out x.npz --teacher runs/t/model.safetensors --n 50000

Prints one JSON line: the path, the image count, the teacher and the agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weatcli import checkpoint as ckpt
from weatcli import data as data_mod


def train_teacher(out: Path, epochs: int) -> Path:
    """`weat train --preset digits-standard` (clean training, selected on clean accuracy)."""
    if not (out / "model.safetensors").exists():
        cmd = [sys.executable, "-m", "weatcli", "train", "--preset", "digits-standard", "--epochs", str(epochs),
               "--device", "cpu", "--out", str(out), "--json"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "model.safetensors"


def warp(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine warps of float images (B, C, H, W) in [0, 1] plus pixel noise -> uint8 (B, C, H, W)."""
    b, _, h, w = x.shape

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle, shear = u(-15, 15) * math.pi / 180, u(-10, 10) * math.pi / 180
    scale = u(0.85, 1.15)
    tx, ty = u(-1.5, 1.5) * 2 / w, u(-1.5, 1.5) * 2 / h  # pixels -> affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + torch.tan(shear) * cos, tx], 1),
                         torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3): output -> input coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out + (6 / 255) * torch.randn(out.shape, generator=generator)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def make(out: Path, teacher: Path, n: int, seed: int) -> dict:
    ds = data_mod.load("digits", None)
    model = ckpt.load(teacher).model.eval()
    g = torch.Generator().manual_seed(seed)
    images, labels, sources = [], [], []
    for start in range(0, n, 1024):
        idx = torch.randint(0, len(ds.train_y), (min(1024, n - start),), generator=g)
        x = warp(data_mod.to_float(ds.train_x[idx]), g)  # (b, 1, 16, 16) uint8
        with torch.no_grad():
            labels.append(model(data_mod.to_float(x)).argmax(1))
        images.append(x[:, 0])  # (b, 16, 16): grey images, as weat's extra-data reader takes them
        sources.append(ds.train_y[idx])
    image = torch.cat(images).numpy()
    label, source = torch.cat(labels).numpy().astype(np.int64), torch.cat(sources).numpy().astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, image=image, label=label, source_label=source)  # uncompressed: weat maps it
    return {"path": str(out), "n": int(len(label)), "teacher": str(teacher),
            "teacher_agrees_with_source": round(float((label == source).mean()), 4),
            "class_counts": np.bincount(label, minlength=10).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits-extra.npz"))
    p.add_argument("--n", type=int, default=20_000, help="images to make")
    p.add_argument("--teacher", type=Path, help="a weat checkpoint to label with (default: train digits-standard)")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    teacher = args.teacher or train_teacher(args.out.with_name(args.out.stem + "-teacher"), args.teacher_epochs)
    print(json.dumps(make(args.out, teacher, args.n, args.seed)))


if __name__ == "__main__":
    main()
