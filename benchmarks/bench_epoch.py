"""A full CIFAR-10-shaped WEAT training epoch through the real `weatcli.train.fit`: seconds/epoch.

Writes N random uint8 images (32x32x3, labels 0..9; timing does not depend on content) with a
test split into a temporary .npz in the layout `npz:PATH` reads (x_train (N, 32, 32, 3) uint8,
y_train (N,), x_test, y_test), then runs `fit` with the cifar10-weat-adv preset (ResNet-18,
WEAT-adv, TRADES-KL attack of 10 steps, batch 128) overridden to that dataset, --epochs epochs,
--arch, --precision, a small eval_n / energy_n, and a temporary run directory. The figure is
`train_seconds` of the metrics row (the training batches only; `seconds` adds the per-epoch
evaluation and energy tracking, here on eval_n / energy_n images). On CUDA the default is 2 epochs
and the headline is the last one: the first also pays for cuDNN autotuning (and compilation).

--baseline adds a reference epoch of the paper's loop on the same images, in this process:
benchmarks/bench_train.py's `reference_step` (natural softmax recomputed at every attack step,
fp32, model as built) fed by a DataLoader with torchvision transforms (RandomCrop 32 pad 4 + flip +
ToTensor on PIL images). Its ratio is reference seconds / weat train_seconds.

--compile, --cuda-graphs and --tf32 set `train.compile`, `train.cuda_graphs` and `train.tf32`.
The reference epoch runs with PyTorch's default TF32 settings (cuDNN convolutions in TF32), not the
ones fit() leaves behind, and with cudnn.benchmark on.

    python benchmarks/bench_epoch.py                                  # CPU: 64 images, batch 32
    python benchmarks/bench_epoch.py --device cuda                    # 50,000 images, bf16, 2 epochs
    python benchmarks/bench_epoch.py --device cuda --baseline --arch wrn-34-10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchutil import cudnn_tf32, environment, gib, peak_memory, reset_peak_memory, sync, write_json
from weatcli.config import resolve
from weatcli.runtime import resolve_device
from weatcli.train import fit

TARGET_S = 9.0  # issue #6: <= 9 s/epoch for resnet18 on an H100


def write_npz(path: Path, n: int, n_test: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path,
             x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, n, dtype=np.int64),
             x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, n_test, dtype=np.int64))


def speed_overrides(args) -> tuple[dict, dict]:
    """--compile, --cuda-graphs, --tf32 as config overrides, and an on/off note of each for the JSON."""
    chosen = {"compile": args.compile, "cuda_graphs": args.cuda_graphs, "tf32": args.tf32}
    return {f"train.{k}": True for k, on in chosen.items() if on}, {k: "on" if on else "off" for k, on in chosen.items()}


def reference_epoch(cfg, npz: Path, device: torch.device, *, workers: int, warmup: int, limit: int | None,
                    tf32_defaults: tuple[bool, bool]) -> dict:
    """One epoch of bench_train's reference loop; returns its seconds (extrapolated if `limit` batches)."""
    from torchvision import transforms

    from bench_train import _PILDataset, reference_step
    from weatcli.models import build

    with np.load(npz) as z:
        x, y = z["x_train"].transpose(0, 3, 1, 2), z["y_train"]  # NCHW, as _PILDataset takes
    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model.arch, num_classes=10, in_channels=3, image_size=32, mean=cfg.model.mean, std=cfg.model.std).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=cfg.data.crop_padding), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    if device.type == "cuda":  # PyTorch's defaults (fit() sets them from train.tf32), cuDNN autotuning on
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32_defaults
    bs = min(cfg.train.batch_size, len(x))
    loader = torch.utils.data.DataLoader(_PILDataset(x, y, tf), batch_size=bs, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    batches = len(loader)
    for i, (xb, yb) in enumerate(loader):  # warm-up (cuDNN autotuning, allocator), untimed
        if i >= warmup:
            break
        reference_step(model, opt, xb.to(device), yb.to(device), cfg)
    before = reset_peak_memory(device)
    sync(device)
    t0 = time.perf_counter()
    done = 0
    for xb, yb in loader:
        reference_step(model, opt, xb.to(device), yb.to(device), cfg)
        done += 1
        if limit and done >= limit:
            break
    sync(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory(device)
    return {"batches_timed": done, "batches_per_epoch": batches, "seconds_timed": seconds,
            "seconds_per_epoch": seconds * batches / done, "extrapolated": done < batches, "workers": workers,
            "peak_memory_bytes": peak, "peak_memory_above_baseline_bytes": None if peak is None else peak - before,
            "precision": "fp32", "cudnn_allow_tf32": cudnn_tf32(), "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cifar10-weat-adv")
    ap.add_argument("--n", type=int, default=None, help="training images (default 50,000 on CUDA, 64 on CPU)")
    ap.add_argument("--n-test", type=int, default=None, help="test images in the file (default 10,000 on CUDA, 32 on CPU)")
    ap.add_argument("--epochs", type=int, default=None, help="default 2 on CUDA (the last is the headline), 1 on CPU")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--precision", default=None, help="train.precision: fp32, bf16 or fp16; default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's (128) on CUDA, 32 on CPU")
    ap.add_argument("--eval-n", type=int, default=None, help="train.eval_n (default 500 on CUDA, 16 on CPU)")
    ap.add_argument("--energy-n", type=int, default=None, help="train.energy_n (default 500 on CUDA, 16 on CPU)")
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--cuda-graphs", action="store_true", help="train.cuda_graphs=true")
    ap.add_argument("--tf32", action="store_true", help="train.tf32=true")
    ap.add_argument("--baseline", action="store_true", help="also time a reference epoch of the paper's loop")
    ap.add_argument("--baseline-workers", type=int, default=0, help="DataLoader workers of the reference (bench_train: 0)")
    ap.add_argument("--baseline-warmup", type=int, default=None, help="untimed reference batches (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--baseline-batches", type=int, default=0, help="time only this many reference batches and extrapolate")
    ap.add_argument("--sync-debug", action="store_true",
                    help="CUDA: count the host syncs of the run (torch.cuda.set_sync_debug_mode), to check the GPU never waits")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_epoch.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (50_000 if cuda else 64)
    n_test = args.n_test or (10_000 if cuda else 32)
    epochs = args.epochs or (2 if cuda else 1)
    precision = args.precision or ("bf16" if cuda else "fp32")
    extra, speed_notes = speed_overrides(args)
    tf32_defaults = (cudnn_tf32(), bool(torch.backends.cuda.matmul.allow_tf32))  # before fit() changes them

    with tempfile.TemporaryDirectory(prefix="weat-bench-epoch-") as tmp:
        npz = Path(tmp) / "cifar-shaped.npz"
        write_npz(npz, n, n_test, args.seed)
        overrides = {
            "data.dataset": f"npz:{npz}", "model.arch": args.arch, "train.epochs": epochs, "train.precision": precision,
            "train.device": str(device), "train.eval_n": args.eval_n or (500 if cuda else 16),
            "train.energy_n": args.energy_n or (500 if cuda else 16), "train.out": str(Path(tmp) / "run"),
            "train.batch_size": args.batch_size or (None if cuda else 32), "train.seed": args.seed, **extra,
        }
        cfg = resolve(preset=args.preset, overrides=overrides)

        def progress(kind: str, payload: dict) -> None:
            if kind == "epoch":
                r = payload["row"]
                print(f"  epoch {r['epoch']}: train {r['train_seconds']:.2f} s, with evaluation {r['seconds']:.2f} s",
                      file=sys.stderr)

        before = reset_peak_memory(device)
        syncs = None
        if args.sync_debug and cuda:
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    res = fit(cfg, on_event=progress)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            print(f"  host syncs during the run (training, evaluation, checkpoints): {syncs}", file=sys.stderr)
        else:
            res = fit(cfg, on_event=progress)
        weat_peak = peak_memory(device)
        weat_tf32 = cudnn_tf32() if cuda else None  # as fit() left it (train.tf32)
        history = res.history
        baseline = None
        if args.baseline:
            baseline = reference_epoch(cfg, npz, device, workers=args.baseline_workers,
                                       warmup=args.baseline_warmup if args.baseline_warmup is not None else (3 if cuda else 1),
                                       limit=args.baseline_batches or None, tf32_defaults=tf32_defaults)

    last = history[-1]
    batches = n // min(cfg.train.batch_size, n)
    train_s = float(last["train_seconds"])
    env = environment(device)
    result = {
        "benchmark": "WEAT training epoch through weatcli.train.fit on CIFAR-10-shaped random data",
        **env, "preset": args.preset, "arch": cfg.model.arch, "method": cfg.train.method, "precision": precision,
        "n_train": n, "n_test": n_test, "batch_size": cfg.train.batch_size, "batches_per_epoch": batches,
        "attack_steps": cfg.attack.steps, "eval_steps": cfg.attack.eval_steps, "eval_n": cfg.train.eval_n,
        "energy_n": cfg.train.energy_n, "epochs": epochs, "speed_options": speed_notes,
        "train_config": cfg.train.model_dump(mode="json"),
        "history": history, "train_seconds_per_epoch": [r["train_seconds"] for r in history],
        "seconds_per_epoch": [r["seconds"] for r in history],
        "host_syncs": syncs,
        "headline_train_seconds": train_s, "images_per_s": batches * cfg.train.batch_size / train_s,
        "projected_100_epochs_train_seconds": 100 * train_s * 50_000 / n,
        "projected_100_epochs_seconds_with_this_eval": 100 * float(last["seconds"]) * 50_000 / n,
        "weat_cudnn_allow_tf32": weat_tf32, "peak_memory_bytes": weat_peak, "peak_memory_above_baseline_bytes": None if weat_peak is None else weat_peak - before,
        "baseline": baseline,
        "ratio_reference_over_weat": baseline["seconds_per_epoch"] / train_s if baseline else None,
    }
    on_h100 = cuda and "H100" in env["device_name"].upper()
    target = ("met" if train_s * 50_000 / n <= TARGET_S else "NOT met") if on_h100 and cfg.model.arch == "resnet18" and n == 50_000 \
        else "not judged (the target is resnet18 on 50,000 images on an H100)"
    result["target"] = f"<= {TARGET_S:g} s/epoch for resnet18 on an H100: {target}"

    print(f"WEAT epoch on {env['device_name']} ({device}, torch {torch.__version__}, {env['threads']} threads): "
          f"{cfg.model.arch}, {precision}, {n:,} images, batch {cfg.train.batch_size} ({batches} steps), "
          f"{cfg.attack.steps}-step attack; " + ", ".join(f"{k} {v}" for k, v in speed_notes.items()))
    print(f"{'epoch':>5} {'train s':>9} {'with eval s':>12} {'img/s':>8}")
    for r in history:
        print(f"{r['epoch']:>5} {r['train_seconds']:>9.2f} {r['seconds']:>12.2f} {batches * cfg.train.batch_size / r['train_seconds']:>8.0f}")
    scale = "" if n == 50_000 else f", scaled x{50_000 / n:g} from {n:,}"
    print(f"projected 100 epochs of 50,000 images{scale}: {result['projected_100_epochs_train_seconds'] / 60:.1f} min training, "
          f"{result['projected_100_epochs_seconds_with_this_eval'] / 60:.1f} min with this run's evaluation "
          f"(eval_n {cfg.train.eval_n}, energy_n {cfg.train.energy_n})")
    print(f"peak GPU memory: {gib(weat_peak)}")
    if baseline:
        print(f"reference epoch (fp32, DataLoader + torchvision, {baseline['workers']} workers): "
              f"{baseline['seconds_per_epoch']:.2f} s{' (extrapolated)' if baseline['extrapolated'] else ''}, "
              f"peak memory {gib(baseline['peak_memory_bytes'])}; ratio reference / weat {result['ratio_reference_over_weat']:.2f}x")
    print(f"target <= {TARGET_S:g} s/epoch (resnet18, H100): {target}")
    write_json(args.out, result)
    print(f"headline: {cfg.model.arch} {precision} WEAT epoch, {n:,} images: {train_s:.2f} s/epoch training "
          f"(100 epochs of 50,000 images{scale}: {result['projected_100_epochs_train_seconds'] / 60:.1f} min)"
          + (f"; {result['ratio_reference_over_weat']:.2f}x the reference" if baseline else ""))


if __name__ == "__main__":
    main()
