"""PGD-20 evaluation: weat's engine vs torchattacks' PGD, same model, images and seed, fp32.

Both compute what a robust-accuracy evaluation needs (clean predictions, PGD-20 with a uniform
random start, predictions on the adversarial points) in this process on the same device:
- weat: `weatcli.evaluate.evaluate_model(attacks=["pgd"])`, the path `weat attack` runs (sanity
  checks and energies included);
- torchattacks: `torchattacks.PGD(model, eps, alpha, steps=20, random_start=True)` (a benchmark-only
  baseline) with a clean and an adversarial forward pass around it.
Repeats are interleaved so drifting machine load hits both alike; the best repeat of each is
reported as throughput (images/s), with the ratio (weat / torchattacks) and both robust accuracies.
Writes benchmarks/results/bench_attack.json.

    python benchmarks/bench_attack.py                          # digits small-cnn, quickly adversarially trained
    python benchmarks/bench_attack.py --ckpt runs/x/model.safetensors --n 1000
    python benchmarks/bench_attack.py --arch resnet18 --synthetic 512 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from weatcli import checkpoint as ckpt_mod
from weatcli import data as data_mod
from weatcli.config import resolve
from weatcli.evaluate import evaluate_model
from weatcli.models import build
from weatcli.attacks import folded_eval_model
from weatcli.runtime import configure_backends, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quick_digits_model(epochs: int) -> Path:
    """A small-cnn PGD-AT digits checkpoint (eps 0.1), trained in seconds into a temporary directory."""
    from weatcli.train import fit

    out = Path(tempfile.mkdtemp(prefix="weat-bench-")) / "run"
    cfg = resolve(preset="digits-pgd-at", overrides={
        "train.epochs": epochs, "train.eval_n": 64, "train.energy_n": 64, "train.device": "cpu", "train.out": str(out)})
    return fit(cfg).checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a weat checkpoint (default: a quickly trained digits small-cnn)")
    ap.add_argument("--arch", default=None, help="with --synthetic: the architecture (e.g. resnet18), random weights")
    ap.add_argument("--synthetic", type=int, default=0, help="N random CIFAR-shaped images (3x32x32, 10 classes)")
    ap.add_argument("--n", type=int, default=None, help="images attacked (default: the whole digits test set / N)")
    ap.add_argument("--eps", type=float, default=None, help="default: the checkpoint's, else 8/255")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-n", type=int, default=None, help="images of the untimed warm-up run of each (default: all n)")
    ap.add_argument("--train-epochs", type=int, default=3, help="epochs of the default digits model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_attack.json")
    args = ap.parse_args()

    import torchattacks

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configure_backends(device, tf32=False)  # as `weat attack` sets them up (IEEE fp32); torchattacks runs under the same
    if args.synthetic:
        torch.manual_seed(args.seed)
        arch = args.arch or "resnet18"
        model = build(arch, num_classes=10, in_channels=3, image_size=32)
        g = torch.Generator().manual_seed(args.seed)
        x_u8 = torch.randint(0, 256, (args.synthetic, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (args.synthetic,), generator=g)
        eps, step = args.eps or 8 / 255, (args.eps or 8 / 255) / 4
        source = f"synthetic {args.synthetic} x 3x32x32, {arch} (random weights)"
    else:
        path = Path(args.ckpt) if args.ckpt else quick_digits_model(args.train_epochs)
        ck = ckpt_mod.load(path)
        model, arch = ck.model, ck.config.model.arch
        ds = data_mod.load(ck.config.data.dataset, ck.config.data.data_dir)
        x_u8, y = ds.test_x, ds.test_y
        a = ck.config.attack
        eps = args.eps or a.eps
        step = eps * a.step_size / a.eps
        source = f"{ck.config.data.dataset} test, {arch} ({'given checkpoint' if args.ckpt else f'PGD-AT, {args.train_epochs} epochs'})"
    n = min(args.n or len(x_u8), len(x_u8))
    model = model.to(device).eval()
    x_u8, y = x_u8[:n].to(device), y[:n].to(device)
    x = data_mod.to_float(x_u8)
    bs = args.batch_size
    # Whether weat's attack runs on the BN-folded copy (folded_eval_model falls back to the model itself
    # when the copy's logits differ beyond rounding on this device).
    folded = folded_eval_model(model, x[: min(n, 32)]) is not model

    def run_weat(k: int = n) -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        r = evaluate_model(model=model, x=x_u8[:k], y=y[:k], attacks=["pgd"], eps=eps, steps=args.steps, step_size=step,
                           batch_size=bs, seed=args.seed)
        _sync(device)
        return time.perf_counter() - t0, r.attacks["pgd"].robust_accuracy

    def run_torchattacks(k: int = n) -> tuple[float, float]:
        torch.manual_seed(args.seed)  # torchattacks draws its random start from the global generator
        atk = torchattacks.PGD(model, eps=eps, alpha=step, steps=args.steps, random_start=True)
        _sync(device)
        t0 = time.perf_counter()
        robust = 0
        for i in range(0, k, bs):
            xb, yb = x[i : i + bs], y[i : i + bs]
            with torch.no_grad():
                clean = model(xb).argmax(1) == yb
            x_adv = atk(xb, yb)
            with torch.no_grad():
                robust += int((clean & (model(x_adv).argmax(1) == yb)).sum())
        _sync(device)
        return time.perf_counter() - t0, robust / k

    warm = min(args.warmup_n or n, n)
    run_weat(warm), run_torchattacks(warm)  # warm-up: allocator, oneDNN / cuDNN kernel choice
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_weat())
        theirs.append(run_torchattacks())
    our_s, our_acc = min(ours)
    ta_s, ta_acc = min(theirs)
    result = {
        "benchmark": "PGD evaluation: weat engine vs torchattacks.PGD",
        "source": source, "arch": arch, "n": n, "batch_size": bs, "steps": args.steps, "eps": eps, "step_size": step,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "torchattacks": torchattacks.__version__,
        "weat_folded": folded, "weat_seconds": our_s, "torchattacks_seconds": ta_s,
        "weat_images_per_s": n / our_s, "torchattacks_images_per_s": n / ta_s, "ratio": ta_s / our_s,
        "weat_robust_accuracy": our_acc, "torchattacks_robust_accuracy": ta_acc,
        "all_weat_seconds": [s for s, _ in ours], "all_torchattacks_seconds": [s for s, _ in theirs],
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{source}; n={n}, batch {bs}, PGD-{args.steps}, eps {eps:.4g}, {device}, {torch.get_num_threads()} threads")
    print(f"weat:         {n / our_s:9.1f} img/s   robust accuracy {our_acc:.4f}")
    print(f"torchattacks: {n / ta_s:9.1f} img/s   robust accuracy {ta_acc:.4f}")
    print(f"ratio (weat / torchattacks throughput): {ta_s / our_s:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
