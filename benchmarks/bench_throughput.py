"""PGD step throughput (image-steps/s), achieved TFLOP/s and the fraction of the device's peak.

One image-step is what a PGD iteration costs per image: a forward pass, the gradient with respect
to the input (weights frozen, so no weight gradients), and the sign step with its projection. It
is measured with weatcli.attacks.pgd (CE objective, uniform start, Linf 8/255, step 2/255) on
random CIFAR-shaped data (3x32x32, 10 classes; timing does not depend on content or weights), for
every architecture x precision x path, in this process, interleaved:
- path `attack_mode`: the model as training holds it (channels_last on CUDA) inside
  attacks.attack_mode, which is how the training attack (losses.method_attack) runs;
- path `folded`: attacks.folded_eval_model (BatchNorm folded into the convolutions,
  channels_last), which is what `weat attack` and `weat sample` run;
- with --compile, each path again through torch.compile (`+compile`; plus the fused sign/clamp
  update, `engine_options(fused_update=True)`, as train.compile does);
- with --cuda-graphs, each path again under `engine_options(cuda_graphs=True)` (`+graphs`: one PGD
  step captured as a CUDA graph and replayed).
Precision bf16 is torch.autocast(device_type, dtype=torch.bfloat16) around the attack, as training
runs it; fp32 is plain IEEE fp32 unless --tf32 (weat's train.tf32 default is off; with --tf32 the
fp32 peak is the TF32 tensor-core one, else the non-tensor FP32 one).

FLOPs per image-step are counted with torch.utils.flop_counter.FlopCounterMode on one forward +
input-gradient pass (matmuls and convolutions; divided by the batch). Achieved TFLOP/s = counted
FLOPs x image-steps/s; the limit is peak / counted FLOPs image-steps/s. Dense peaks come from a
table matched on torch.cuda.get_device_name() (H100 SXM / PCIe / NVL, H200, A100) or from
--peak-tflops; on a CPU the peak is unknown (null) unless given. Peak GPU memory is measured on
one untimed run per configuration (reset in between). Figures are medians over interleaved runs.

    python benchmarks/bench_throughput.py                                     # CPU: resnet18, batch 32
    python benchmarks/bench_throughput.py --device cuda                       # resnet18 + wrn-34-10, batch 512
    python benchmarks/bench_throughput.py --device cuda --arch resnet18 --compile --cuda-graphs
    python benchmarks/bench_throughput.py --peak-tflops bf16=989,fp32=494     # override the table
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchutil import (ISSUE_H100_BF16_TFLOPS, ISSUE_TARGET_FRACTION, environment, gib, parse_peak_override, peak_for,
                       peak_memory, peak_table_entry, reset_peak_memory, timed, write_json)
from weatcli.attacks import attack_mode, engine_options, folded_eval_model, pgd
from weatcli.models import ARCHS, build
from weatcli.runtime import configure_backends, resolve_device

EPS, STEP = 8 / 255, 2 / 255
SHAPE, CLASSES = (3, 32, 32), 10


def count_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(FLOPs of forward + input gradient, FLOPs of the forward alone) per image, fp32, weights frozen."""
    with attack_mode(model):
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(x)
        x = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as both:
            loss = F.cross_entropy(model(x).float(), y, reduction="none").sum()
            loss.backward()  # only x requires grad; (autograd.grad trips FlopCounterMode's module hooks)
    return both.get_total_flops() / len(x), fwd.get_total_flops() / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=None, help="comma-separated (default: resnet18,wrn-34-10 on CUDA, resnet18 on CPU)")
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--paths", default="attack_mode,folded", help="comma-separated: attack_mode, folded")
    ap.add_argument("--batch-size", type=int, default=None, help="default 512 on CUDA, 32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="PGD steps per timed run (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 10 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per configuration (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--compile", action="store_true", help="also time every path through torch.compile")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--cuda-graphs", action="store_true", help="also time every path with the PGD step as a CUDA graph")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 convolutions/matmuls in fp32 (weat's train.tf32)")
    ap.add_argument("--peak-tflops", default=None, help="dense peak: one number, or e.g. bf16=989,fp32=494")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bench_throughput.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    archs = [a.strip() for a in (args.arch or ("resnet18,wrn-34-10" if cuda else "resnet18")).split(",") if a.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for a in archs:
        if a not in ARCHS:
            ap.error(f"--arch: unknown {a!r}; expected some of {', '.join(ARCHS)}")
    if not set(precisions) <= {"fp32", "bf16"} or not set(paths) <= {"attack_mode", "folded"}:
        ap.error("--precision takes fp32,bf16 and --paths attack_mode,folded")
    bs = args.batch_size or (512 if cuda else 32)
    steps = args.steps or (10 if cuda else 2)
    repeats = args.repeats or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    override = parse_peak_override(args.peak_tflops)
    configure_backends(device, args.tf32)  # as weat train sets them up
    table_label, _ = peak_table_entry(device)

    rows = []
    for arch in archs:
        torch.manual_seed(args.seed)
        model = build(arch, num_classes=CLASSES, in_channels=SHAPE[0], image_size=SHAPE[1]).to(device).eval()
        g0 = torch.Generator(device=device).manual_seed(args.seed)
        x = torch.rand((bs, *SHAPE), generator=g0, device=device)
        y = torch.randint(0, CLASSES, (bs,), generator=g0, device=device)
        if cuda:  # the layout fit() trains in
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        n_count = min(bs, 8)
        flops, fwd_flops = count_flops(model, x[:n_count], y[:n_count])

        # path name -> (model, engine options)
        models: dict[str, tuple[torch.nn.Module, dict]] = {}
        folded_ok = None
        if "attack_mode" in paths:
            models["attack_mode"] = (model, {})
        if "folded" in paths:
            folded = folded_eval_model(model.eval(), x[:8])
            folded_ok = folded is not model
            models["folded"] = (folded, {})
        base = list(models.items())
        if args.compile:
            fused = {"fused_update": True}
            for name, (m, _) in base:
                models[f"{name}+compile"] = (torch.compile(m, mode=args.compile_mode), fused)
        if args.cuda_graphs:
            for name, (m, _) in base:
                models[f"{name}+graphs"] = (m, {"cuda_graphs": True})

        def runner(m: torch.nn.Module, options: dict, precision: str):
            def run() -> None:
                g = torch.Generator(device=device).manual_seed(args.seed + 1)
                amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
                engine = engine_options(**options) if options else contextlib.nullcontext()
                with attack_mode(m), amp, engine:
                    pgd(m, x, y, eps=EPS, step_size=STEP, steps=steps, objective="ce", init="uniform", generator=g)
            return run

        configs = [(p, prec) for p in models for prec in precisions]
        fns = {c: runner(*models[c[0]], c[1]) for c in configs}
        compile_s: dict = {}
        for c in configs:  # warm-up: cuDNN algorithm choice, allocator, compilation
            first = timed(fns[c], device)
            compile_s[c] = first if "+" in c[0] else None  # compilation or graph capture
            for _ in range(max(warmup - 1, 0)):
                fns[c]()
        memory = {c: (None, None) for c in configs}
        for c in configs if cuda else []:  # peak memory of one run, alone
            before = reset_peak_memory(device)
            fns[c]()
            peak = peak_memory(device)
            memory[c] = (peak, peak - before)
        times: dict = {c: [] for c in configs}
        for r in range(repeats):  # interleaved; the order rotates so drifting load hits all alike
            k = r % len(configs)
            for c in configs[k:] + configs[:k]:
                times[c].append(timed(fns[c], device))

        for c in configs:
            path, precision = c
            med = statistics.median(times[c])
            ips = bs * steps / med
            peak, peak_source = peak_for(precision, device, override)
            limit = peak * 1e12 / flops if peak else None
            rows.append({
                "arch": arch, "path": path, "precision": precision, "batch_size": bs, "steps_per_run": steps,
                "folded": folded_ok if path.startswith("folded") else None,
                "gflop_per_image_step": flops / 1e9, "gflop_forward_per_image": fwd_flops / 1e9,
                "seconds_per_run_median": med, "seconds_per_run": times[c],
                "image_steps_per_s": ips, "ms_per_pgd_step": med / steps * 1e3,
                "achieved_tflops": flops * ips / 1e12,
                "peak_tflops": peak, "peak_source": peak_source,
                "limit_image_steps_per_s": limit, "fraction_of_peak": ips / limit if limit else None,
                "peak_memory_bytes": memory[c][0], "peak_memory_above_baseline_bytes": memory[c][1],
                "first_run_seconds_with_compile_or_capture": compile_s[c],
            })
        del models, fns, model
        if cuda:
            torch.cuda.empty_cache()

    env = environment(device)
    print(f"PGD step throughput on {env['device_name']} ({device}, torch {torch.__version__}, {env['threads']} threads), "
          f"batch {bs}, {steps} steps per run, median of {repeats}")
    print(f"{'arch':<10} {'path':<20} {'prec':<5} {'GFLOP/img-step':>14} {'img-steps/s':>12} {'TFLOP/s':>8} "
          f"{'peak':>6} {'limit':>10} {'of peak':>8} {'peak mem':>10}")
    for r in rows:
        limit = f"{r['limit_image_steps_per_s']:,.0f}" if r["limit_image_steps_per_s"] else "-"
        frac = f"{r['fraction_of_peak']:.1%}" if r["fraction_of_peak"] is not None else "-"
        peak = f"{r['peak_tflops']:g}" if r["peak_tflops"] else "-"
        print(f"{r['arch']:<10} {r['path']:<20} {r['precision']:<5} {r['gflop_per_image_step']:>14.3f} "
              f"{r['image_steps_per_s']:>12,.0f} {r['achieved_tflops']:>8.3f} {peak:>6} {limit:>10} {frac:>8} "
              f"{gib(r['peak_memory_bytes']):>10}")

    # Headline: the fastest path for resnet18 in bf16 (else the first arch / precision measured).
    arch0 = "resnet18" if "resnet18" in archs else archs[0]
    prec0 = "bf16" if "bf16" in precisions else precisions[0]
    head = max((r for r in rows if r["arch"] == arch0 and r["precision"] == prec0), key=lambda r: r["image_steps_per_s"])
    anchor = None
    if table_label and table_label.startswith("H100") and prec0 == "bf16":
        anchor_limit = ISSUE_H100_BF16_TFLOPS * 1e12 / head["gflop_per_image_step"] / 1e9
        anchor = {"tflops": ISSUE_H100_BF16_TFLOPS, "limit_image_steps_per_s": anchor_limit,
                  "fraction": head["image_steps_per_s"] / anchor_limit}
        print(f"issue anchor: {ISSUE_H100_BF16_TFLOPS:g} TFLOP/s / {head['gflop_per_image_step']:.2f} GFLOP = "
              f"{anchor_limit:,.0f} image-steps/s; achieved {anchor['fraction']:.1%} of it")
    if head["fraction_of_peak"] is None:
        target = "not judged (peak unknown on this device)"
    elif not (table_label or "").startswith("H100") or prec0 != "bf16" or arch0 != "resnet18":
        target = "not judged (the target is for resnet18 bf16 on an H100)"
    else:
        target = "met" if head["fraction_of_peak"] >= ISSUE_TARGET_FRACTION else "NOT met"
    result = {
        "benchmark": "PGD step throughput (image-steps/s), achieved TFLOP/s and fraction of peak",
        **env, "peak_table_match": table_label, "peak_tflops_override": override,
        "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None,
        "cuda_graphs": args.cuda_graphs, "tf32": args.tf32,
        "eps": EPS, "step_size": STEP, "image_shape": list(SHAPE), "num_classes": CLASSES,
        "batch_size": bs, "steps_per_run": steps, "repeats": repeats, "warmup": warmup,
        "rows": rows, "headline": head, "issue_anchor": anchor,
        "target": f">= {ISSUE_TARGET_FRACTION:.0%} of the bf16 limit for resnet18 on an H100: {target}",
    }
    write_json(args.out, result)
    frac = f", {head['fraction_of_peak']:.1%} of the {head['peak_source']} peak ({head['peak_tflops']:g} TFLOP/s; " \
           f"limit {head['limit_image_steps_per_s']:,.0f} image-steps/s)" if head["fraction_of_peak"] is not None else ", peak unknown"
    print(f"target >= {ISSUE_TARGET_FRACTION:.0%} of the bf16 limit (resnet18, H100): {target}")
    print(f"headline: {arch0} {prec0} PGD ({head['path']}, batch {bs}): {head['image_steps_per_s']:,.0f} image-steps/s, "
          f"{head['achieved_tflops']:.3g} TFLOP/s at {head['gflop_per_image_step']:.2f} GFLOP/image-step{frac}")


if __name__ == "__main__":
    main()
