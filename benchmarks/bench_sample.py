"""SGLD sampling: weat's engine vs a straightforward reference loop of the same update.

Both run SGLD with momentum on E(x, y) = -f(x)_y (docs/science.md#sgld) for the same model, batch,
starting points and noise, in this process, on the same device:
- reference: the loop as research samplers write it: the model's weights keep requires_grad, so
  every step's backward also computes (and accumulates) weight gradients, zeroed each step; the
  input gradient is read from x.grad; garbage collection (and on CUDA cache emptying) every step;
- weat: what `weat sample` runs: weatcli.sampling.sgld on the model with BatchNorm folded into the
  convolutions (attacks.folded_eval_model), inside attacks.attack_mode: frozen weights,
  torch.autograd.grad with respect to the input only, no per-step host sync, garbage collection or
  cache emptying.
The two must agree to float precision (checked first). Runs of `--steps` SGLD steps alternate
between the implementations (the order flips every repeat, so load from other processes hits
both alike); the figure is the median run. Prints image-steps per second of each and the ratio,
and writes a JSON of the figures.

    python benchmarks/bench_sample.py                                  # digits small-cnn, CPU
    python benchmarks/bench_sample.py --checkpoint runs/x/model.safetensors --batch 500 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from weatcli import checkpoint as ckpt_mod
from weatcli.attacks import attack_mode, folded_eval_model
from weatcli.models import build
from weatcli.sampling import sgld
from weatcli.runtime import resolve_device


def reference_sgld(model, x0, y, *, steps, step_size, momentum, noise, alpha, generator, collect=True):
    """The update written the straightforward way (weight gradients, gc every step)."""
    model.eval()
    x = x0.clone()
    v = torch.zeros_like(x)
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        energy = -logits.gather(1, y[:, None]).sum()
        model.zero_grad()
        energy.backward()  # weights still require grad: their gradients are computed too
        v = momentum * v - step_size / 2 * x.grad.detach()
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = torch.clamp(x.detach() + v + alpha * noise * eps, 0.0, 1.0)
        if collect:
            gc.collect()
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
    return x.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="weat checkpoint (default: a fresh small-cnn for 1x16x16 digits)")
    ap.add_argument("--arch", default="small-cnn", help="architecture of the fresh model when no checkpoint is given")
    ap.add_argument("--shape", default="1,16,16,10", help="C,H,W,classes of the fresh model")
    ap.add_argument("--batch", type=int, default=100, help="images per SGLD batch")
    ap.add_argument("--steps", type=int, default=20, help="SGLD steps per timed run")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (interleaved)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--step-size", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.8)
    ap.add_argument("--noise", type=float, default=0.001)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-gc", action="store_true", help="reference without its per-step gc (weight gradients only)")
    ap.add_argument("--out", default="benchmarks/results/bench_sample.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.checkpoint:
        ck = ckpt_mod.load(args.checkpoint, device=device)
        model, name = ck.model, f"{ck.config.model.arch} ({args.checkpoint})"
        c, h, w, k = ck.in_channels, ck.image_size, ck.image_size, ck.num_classes
    else:
        c, h, w, k = (int(v) for v in args.shape.split(","))
        torch.manual_seed(0)
        model, name = build(args.arch, num_classes=k, in_channels=c, image_size=h).to(device).eval(), f"{args.arch} (fresh)"
    g0 = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand((args.batch, c, h, w), generator=g0, device=device)
    y = torch.randint(0, k, (args.batch,), generator=g0, device=device)
    settings = dict(steps=args.steps, step_size=args.step_size, momentum=args.momentum, noise=args.noise)
    alpha = math.sqrt(2 * args.step_size)

    def gen():
        return torch.Generator(device=device).manual_seed(1)

    def run_reference():
        return reference_sgld(model, x0, y, alpha=alpha, generator=gen(), collect=not args.no_gc, **settings)

    sampler = folded_eval_model(model.eval(), x0[:8])  # what `weat sample` runs: BatchNorm folded into the convolutions

    def run_weat():
        with attack_mode(sampler):
            return sgld(sampler, x0, y, generator=gen(), **settings).x

    # Same update: one step from the same noise agrees to float rounding (the folded BatchNorm
    # changes the last bits); over many steps those bits are amplified where pixels hit the clamp,
    # so the full runs are compared on average and reported.
    one = dict(settings, steps=1)
    a1 = reference_sgld(model, x0, y, alpha=alpha, generator=gen(), collect=False, **one)
    with attack_mode(sampler):
        b1 = sgld(sampler, x0, y, generator=gen(), **one).x
    first_step_diff = float((a1 - b1).abs().max())
    assert first_step_diff < 1e-4, f"one SGLD step: reference and weat disagree by {first_step_diff}"
    a, b = run_reference(), run_weat()
    max_diff, mean_diff = float((a - b).abs().max()), float((a - b).abs().mean())
    assert mean_diff < 1e-3, f"reference and weat samples differ by {mean_diff} on average"

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        timed(run_reference)
        timed(run_weat)
    load_before = os.getloadavg()
    ref, ours = [], []
    for r in range(args.repeats):
        pair = [(ref, run_reference), (ours, run_weat)]
        for bucket, fn in pair if r % 2 == 0 else pair[::-1]:
            bucket.append(timed(fn))
    load_after = os.getloadavg()
    work = args.batch * args.steps  # image-steps per run
    ref_s, our_s = float(np.median(ref)), float(np.median(ours))
    result = {
        "benchmark": "weat SGLD vs reference loop (weight gradients" + (")" if args.no_gc else ", gc each step)"),
        "model": name, "image_shape": [c, h, w], "num_classes": k, "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, **{k_: v for k_, v in settings.items() if k_ != "steps"},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "first_step_max_abs_difference": first_step_diff, "max_abs_difference": max_diff, "mean_abs_difference": mean_diff,
        "reference_s_per_run": ref, "weat_s_per_run": ours,
        "reference_image_steps_per_s": work / ref_s, "weat_image_steps_per_s": work / our_s, "ratio": ref_s / our_s,
        "loadavg_1min_before_after": [load_before[0], load_after[0]], "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"model {name}, batch {args.batch}, {args.steps} steps per run, {args.repeats} runs each, {device} "
          f"({torch.get_num_threads()} threads), load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"reference{' (no gc)' if args.no_gc else ''}: {work / ref_s:9.0f} image-steps/s  (median run {ref_s * 1e3:.0f} ms)")
    print(f"weat:      {work / our_s:9.0f} image-steps/s  (median run {our_s * 1e3:.0f} ms)")
    print(f"ratio (weat / reference): {ref_s / our_s:.2f}x   (one step agrees to {first_step_diff:.1e}; after all steps mean |diff| {mean_diff:.1e}, max {max_diff:.1e})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
