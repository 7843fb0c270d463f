"""WEAT training step: weat's engine vs a straightforward reference implementation of the paper's loop.

Both train the same model (same initial weights) on the same data with the same batch size, in
this process, on the same device:
- reference: torchvision transforms (RandomCrop + flip + ToTensor) on PIL images through a
  DataLoader, the TRADES-KL attack recomputing the natural softmax at every attack step, fp32;
- weat: device-resident uint8 data augmented in batches, the natural softmax computed once per
  batch, frozen weights while attacking (weatcli.losses.weat_adv_loss).
Prints seconds per step of each and the ratio (reference / weat), and writes a JSON of the figures.

    python benchmarks/bench_train.py                      # digits-shaped, small-cnn (CPU default)
    python benchmarks/bench_train.py --preset cifar10-weat-adv --synthetic 2048 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from weatcli import data as data_mod
from weatcli.config import resolve
from weatcli.energy import weat_weights
from weatcli.losses import weat_adv_loss
from weatcli.models import build
from weatcli.attacks import engine_options
from weatcli.runtime import configure_backends, generator_for, resolve_device
from weatcli.train import _autocast, compiled


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, x_nchw_u8: np.ndarray, y: np.ndarray, transform):
        mode = "L" if x_nchw_u8.shape[1] == 1 else "RGB"
        self.images = [Image.fromarray(im.squeeze(0) if mode == "L" else im.transpose(1, 2, 0), mode) for im in x_nchw_u8]
        self.y, self.transform = y, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.y[i])


def reference_step(model, opt, x, y, cfg):
    """The paper's loop as research code writes it (TRADES attack, WEAT-adv loss), fp32."""
    a, beta = cfg.attack, cfg.train.beta
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(a.steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + a.step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - a.eps), x + a.eps).clamp(0.0, 1.0)
    model.train()
    opt.zero_grad()
    logits, logits_adv = model(x), model(x_adv)
    w = weat_weights(logits)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="none").sum(1)
    loss = (w * F.cross_entropy(logits_adv, y, reduction="none")).mean() + beta * (w * kl).mean()
    loss.backward()
    opt.step()


def weat_step(model, opt, x_u8, y, cfg, g):
    """weat's training step as weatcli.train runs it (engine options, autocast, channels_last)."""
    x = data_mod.augment(x_u8, generator=g, padding=cfg.data.crop_padding, flip=cfg.data.flip)
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    t = cfg.train
    with engine_options(cuda_graphs=t.cuda_graphs, fused_update=t.compile), _autocast(x.device, t.precision):
        loss, _ = weat_adv_loss(model, x, y, cfg, generator=g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits-weat")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per block")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=6, help="blocks per implementation, alternating")
    ap.add_argument("--synthetic", type=int, default=0, help="use N random uint8 images of the preset's shape")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="weat's step (the reference is fp32)")
    ap.add_argument("--compile", action="store_true", help="weat: torch.compile the model and fuse the PGD update")
    ap.add_argument("--cuda-graphs", action="store_true", help="weat: replay the PGD steps as CUDA graphs")
    ap.add_argument("--out", default="benchmarks/results/bench_train.json")
    args = ap.parse_args()

    cfg = resolve(preset=args.preset, overrides={"train.device": args.device, "train.precision": args.precision,
                                                 "train.compile": args.compile, "train.cuda_graphs": args.cuda_graphs})
    device = resolve_device(cfg.train.device)
    # The reference runs with PyTorch's defaults (cuDNN may use TF32), weat as `weat train` sets it up.
    default_backends = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                        torch.backends.cuda.matmul.allow_tf32)
    if args.synthetic:
        shapes = {"digits": (1, 16, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10), "tiny-imagenet": (3, 64, 200)}
        c, s, k = shapes[cfg.data.dataset]
        gen = torch.Generator().manual_seed(0)
        train_x = torch.randint(0, 256, (args.synthetic, c, s, s), dtype=torch.uint8, generator=gen)
        train_y = torch.randint(0, k, (args.synthetic,), generator=gen)
        num_classes = k
    else:
        ds = data_mod.load(cfg.data.dataset, cfg.data.data_dir, device="cpu")
        train_x, train_y, num_classes = ds.train_x, ds.train_y, ds.num_classes
    c, s = train_x.shape[1], train_x.shape[2]
    bs = cfg.train.batch_size

    torch.manual_seed(cfg.train.seed)
    init = build(cfg.model.arch, num_classes=num_classes, in_channels=c, image_size=s).state_dict()

    def fresh_model():
        m = build(cfg.model.arch, num_classes=num_classes, in_channels=c, image_size=s).to(device)
        m.load_state_dict(init)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return m, opt

    # Reference input pipeline: PIL images, torchvision transforms, a DataLoader.
    tf = [transforms.RandomCrop(s, padding=cfg.data.crop_padding)] if cfg.data.crop_padding else []
    tf += [transforms.RandomHorizontalFlip()] if cfg.data.flip else []
    loader = torch.utils.data.DataLoader(_PILDataset(train_x.numpy(), train_y.numpy(), transforms.Compose(tf + [transforms.ToTensor()])),
                                         batch_size=bs, shuffle=True, drop_last=True, num_workers=0)

    # Per-step wall times, interleaved in blocks: this machine's timings are noisy (shared
    # cores), so the figure is the median step of each implementation over all blocks.
    ref_model, ref_opt = fresh_model()
    our_model, _ = fresh_model()
    if device.type == "cuda":
        our_model = our_model.to(memory_format=torch.channels_last)
    fused = device.type == "cuda"
    our_opt = torch.optim.SGD(our_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                              foreach=None if fused else True, fused=fused or None)
    our_model = compiled(our_model, args.compile)
    dev_x, dev_y = train_x.to(device), train_y.to(device)
    g = generator_for(device, 0, 0)
    perm = torch.randperm(len(dev_x), generator=g, device=device)
    ref_iter = iter(loader)
    our_pos = 0

    def ref_batch():
        nonlocal ref_iter
        try:
            return next(ref_iter)
        except StopIteration:
            ref_iter = iter(loader)
            return next(ref_iter)

    def one_reference():
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = default_backends
        x, y = ref_batch()  # the DataLoader's work is part of the reference step
        reference_step(ref_model, ref_opt, x.to(device), y.to(device), cfg)

    def one_weat():
        nonlocal our_pos
        configure_backends(device, tf32=False)
        if our_pos + bs > len(dev_x):
            our_pos = 0
        idx = perm[our_pos : our_pos + bs]
        our_pos += bs
        weat_step(our_model, our_opt, dev_x[idx], dev_y[idx], cfg, g)

    def timed(fn, n):
        out = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
        return out

    timed(one_reference, args.warmup)
    timed(one_weat, args.warmup)
    ref, ours = [], []
    for _ in range(args.repeats):
        ref += timed(one_reference, args.steps)
        ours += timed(one_weat, args.steps)
    ref_s, our_s = float(np.median(ref)), float(np.median(ours))
    result = {
        "benchmark": "weat training step vs reference paper loop",
        "preset": args.preset, "arch": cfg.model.arch, "batch_size": bs, "attack_steps": cfg.attack.steps,
        "image_shape": [c, s, s], "device": str(device), "precision": args.precision,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "steps_timed": len(ref), "reference_s_per_step": ref_s,
        "reference_s_per_step_quartiles": np.percentile(ref, [25, 75]).tolist(),
        "weat_s_per_step_quartiles": np.percentile(ours, [25, 75]).tolist(), "weat_s_per_step": our_s, "ratio": ref_s / our_s,
        "reference_images_per_s": bs / ref_s, "weat_images_per_s": bs / our_s,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"reference: {ref_s * 1e3:8.1f} ms/step median of {len(ref)}  ({bs / ref_s:8.0f} img/s)")
    print(f"weat:      {our_s * 1e3:8.1f} ms/step median of {len(ours)}  ({bs / our_s:8.0f} img/s)")
    print(f"ratio (reference / weat): {ref_s / our_s:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
