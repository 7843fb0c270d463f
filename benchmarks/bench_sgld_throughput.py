"""SGLD sampling throughput (image-steps/s) of a CIFAR-shaped ResNet-18 and the projected time of
10,000 samples x 200 steps (issue #6 target: <= 1 min).

Runs weatcli.sampling.sgld with `weat sample`'s defaults (step size 0.1, noise 0.001, momentum 0,
batch 500 on CUDA) on a randomly initialised model of CIFAR shape (3x32x32, 10 classes; timing
does not depend on weights or content), in this process, interleaved, for each path:
- `folded`: attacks.folded_eval_model inside attacks.attack_mode, which is what `weat sample` runs;
- `attack_mode`: the model itself inside attacks.attack_mode (BatchNorm not folded).
Precision fp32 is what `weat sample` runs; bf16 (torch.autocast) is measured with --precision
fp32,bf16 to show what it would give. The backend flags are set as `weat sample` sets them
(train.configure_backends: cudnn.benchmark on, TF32 off). FLOPs per
image-step are counted as in bench_throughput (FlopCounterMode, one forward + input gradient).
Peak GPU memory is measured on one untimed run per configuration (reset in between); null on CPU.

    python benchmarks/bench_sgld_throughput.py                         # CPU: batch 16, 2 steps per run
    python benchmarks/bench_sgld_throughput.py --device cuda           # batch 500, 20 steps per run
    python benchmarks/bench_sgld_throughput.py --device cuda --precision fp32,bf16 --batch-size 1000
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from bench_throughput import count_flops
from benchutil import environment, gib, parse_peak_override, peak_for, peak_memory, reset_peak_memory, timed, write_json
from weatcli.attacks import attack_mode, folded_eval_model
from weatcli.models import ARCHS, build
from weatcli.config import SampleConfig
from weatcli.sampling import sgld
from weatcli.runtime import configure_backends, resolve_device

SHAPE, CLASSES = (3, 32, 32), 10
TARGET_S = 60.0  # issue #6: 10,000 samples x 200 steps in <= 1 min
PROJECT_SAMPLES = 10_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32 (weat sample), bf16")
    ap.add_argument("--paths", default="folded,attack_mode", help="comma-separated: folded, attack_mode")
    ap.add_argument("--batch-size", type=int, default=None, help="default 500 on CUDA (weat sample's), 16 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="SGLD steps per timed run (default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 7 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per configuration (default 2 on CUDA, 1 on CPU)")
    ap.add_argument("--step-size", type=float, default=SampleConfig().step_size)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--noise", type=float, default=SampleConfig().noise)
    ap.add_argument("--project-steps", type=int, default=SampleConfig().steps, help="SGLD steps per sample of the projection")
    ap.add_argument("--peak-tflops", default=None, help="dense peak: one number, or e.g. bf16=989,fp32=494")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_sgld_throughput.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.arch not in ARCHS:
        ap.error(f"--arch: unknown {args.arch!r}; expected one of {', '.join(ARCHS)}")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not set(precisions) <= {"fp32", "bf16"} or not set(paths) <= {"attack_mode", "folded"}:
        ap.error("--precision takes fp32,bf16 and --paths folded,attack_mode")
    bs = args.batch_size or (500 if cuda else 16)
    steps = args.steps or (20 if cuda else 2)
    repeats = args.repeats or (7 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    configure_backends(device, tf32=False)  # as weat sample sets them up
    override = parse_peak_override(args.peak_tflops)

    torch.manual_seed(args.seed)
    model = build(args.arch, num_classes=CLASSES, in_channels=SHAPE[0], image_size=SHAPE[1]).to(device).eval()
    g0 = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.rand((bs, *SHAPE), generator=g0, device=device)
    y = torch.randint(0, CLASSES, (bs,), generator=g0, device=device)
    flops, _ = count_flops(model, x0[: min(bs, 8)], y[: min(bs, 8)])
    models = {}
    if "folded" in paths:  # as sampling.sample_checkpoint builds it
        models["folded"] = folded_eval_model(model.eval(), x0[: min(bs, 8)])
    if "attack_mode" in paths:
        models["attack_mode"] = model
    folded_ok = models["folded"] is not model if "folded" in models else None

    def runner(m: torch.nn.Module, precision: str):
        def run() -> None:
            g = torch.Generator(device=device).manual_seed(args.seed + 1)
            amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with attack_mode(m), amp:
                sgld(m, x0, y, steps=steps, step_size=args.step_size, momentum=args.momentum, noise=args.noise, generator=g)
        return run

    configs = [(p, prec) for p in models for prec in precisions]
    fns = {c: runner(models[c[0]], c[1]) for c in configs}
    for c in configs:
        for _ in range(warmup):
            fns[c]()
    memory = {c: (None, None) for c in configs}
    for c in configs if cuda else []:
        before = reset_peak_memory(device)
        fns[c]()
        peak = peak_memory(device)
        memory[c] = (peak, peak - before)
    times: dict = {c: [] for c in configs}
    for r in range(repeats):
        k = r % len(configs)
        for c in configs[k:] + configs[:k]:
            times[c].append(timed(fns[c], device))

    rows = []
    work = PROJECT_SAMPLES * args.project_steps
    for c in configs:
        path, precision = c
        med = statistics.median(times[c])
        ips = bs * steps / med
        peak, peak_source = peak_for(precision, device, override)
        rows.append({
            "path": path, "precision": precision, "folded": folded_ok if path == "folded" else None,
            "seconds_per_run_median": med, "seconds_per_run": times[c], "image_steps_per_s": ips,
            "ms_per_sgld_step": med / steps * 1e3, "gflop_per_image_step": flops / 1e9,
            "achieved_tflops": flops * ips / 1e12, "peak_tflops": peak, "peak_source": peak_source,
            "fraction_of_peak": flops * ips / 1e12 / peak if peak else None,
            "projected_seconds": work / ips,
            "peak_memory_bytes": memory[c][0], "peak_memory_above_baseline_bytes": memory[c][1],
        })

    env = environment(device)
    print(f"SGLD throughput on {env['device_name']} ({device}, torch {torch.__version__}, {env['threads']} threads): "
          f"{args.arch} (random init), batch {bs}, {steps} steps per run, median of {repeats}; "
          f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    print(f"{'path':<12} {'prec':<5} {'img-steps/s':>12} {'ms/step':>9} {'TFLOP/s':>8} {'of peak':>8} "
          f"{f'{PROJECT_SAMPLES:,} x {args.project_steps}':>14} {'peak mem':>10}")
    for r in rows:
        frac = f"{r['fraction_of_peak']:.1%}" if r["fraction_of_peak"] is not None else "-"
        print(f"{r['path']:<12} {r['precision']:<5} {r['image_steps_per_s']:>12,.0f} {r['ms_per_sgld_step']:>9.1f} "
              f"{r['achieved_tflops']:>8.3f} {frac:>8} {r['projected_seconds']:>12.1f} s {gib(r['peak_memory_bytes']):>10}")

    # Headline: what `weat sample` runs (folded, fp32), else the first configuration.
    head = next((r for r in rows if r["path"] == "folded" and r["precision"] == "fp32"), rows[0])
    on_h100 = cuda and "H100" in env["device_name"].upper()
    target = ("met" if head["projected_seconds"] <= TARGET_S else "NOT met") if on_h100 and args.arch == "resnet18" \
        else "not judged (the target is resnet18 on an H100)"
    result = {
        "benchmark": "SGLD throughput (weatcli.sampling.sgld) and projected time of 10,000 samples x 200 steps",
        **env, "arch": args.arch, "weights": "random init", "image_shape": list(SHAPE), "num_classes": CLASSES,
        "batch_size": bs, "steps_per_run": steps, "repeats": repeats, "warmup": warmup,
        "step_size": args.step_size, "momentum": args.momentum, "noise": args.noise,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "projection": {"samples": PROJECT_SAMPLES, "steps": args.project_steps, "image_steps": work},
        "rows": rows, "headline": head,
        "target": f"<= {TARGET_S:g} s for {PROJECT_SAMPLES:,} samples x {args.project_steps} steps (resnet18, H100): {target}",
    }
    write_json(args.out, result)
    print(f"target <= {TARGET_S:g} s for {PROJECT_SAMPLES:,} x {args.project_steps} steps (resnet18, H100): {target}")
    print(f"headline: {args.arch} SGLD ({head['path']}, {head['precision']}, batch {bs}): {head['image_steps_per_s']:,.0f} "
          f"image-steps/s; {PROJECT_SAMPLES:,} samples x {args.project_steps} steps in {head['projected_seconds']:,.1f} s "
          f"({head['projected_seconds'] / 60:.2f} min); peak memory {gib(head['peak_memory_bytes'])}")


if __name__ == "__main__":
    main()
