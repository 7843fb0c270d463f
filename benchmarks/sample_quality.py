"""Quality and variety of `weat sample` per initialisation and step setting: the table of issue 14.

For every init (uniform, informative, pca, pca-scaled, local-pca, noise) and seed, it samples
`--n-per-class` images per class from MODEL exactly as

    weat sample MODEL --init INIT --seed S --n-per-class N --sgld-steps T --step-size ETA --out ...

does (the same config resolution, in this process), then scores them as

    weat score SAMPLES --features JUDGE --judge JUDGE --metrics fid,kid,prdc,diversity,judge --json

does: FID / KID, precision / recall / density / coverage and the diversity ratio all in the
judge's penultimate feature space (the Inception weights are not available offline), and the
judge's recognition. JUDGE is a classifier other than MODEL (a separately trained standard model).
Two more columns come from pixels: the diversity ratio in pixel space, and `nearest-train`, the
mean distance of a sample to the nearest training image of its class over the same for the real
test images (below 1: closer to the training set than new real digits are; near 0: copies).
The real test split, scored the same way, is the last row.

Rows: every init with 0 steps (the starting points alone) and with `--steps` / `--step-size`; then,
for the `--tune` inits, the settings `--tune-settings` (steps:eta or steps:eta:adaptive, adaptive
being `weat sample --adaptive`: stop at the class-mean E(x,y) of the training data plus this).
Mean ± std over the seeds. `E(x,y) - m_y`: the samples' joint energy under MODEL minus the mean of
the training images of their class (0: as in-distribution as the data; below: overshoot).
Writes per-run JSON and samples under --out (resumable: finished runs are read back), and the
table as JSON and markdown (--table PREFIX: PREFIX.json, PREFIX.md).

    python benchmarks/sample_quality.py                     # runs/digits-weat vs the judge runs/digits-standard
    python benchmarks/sample_quality.py --seeds 0 --inits pca,local-pca --tune ''   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weatcli import checkpoint as ckpt_mod
from weatcli import config as config_mod
from weatcli import data as data_mod
from weatcli import variety
from weatcli.energy import joint_energy
from weatcli.sampling import INITS, class_energy_means, sample_checkpoint
from weatcli.scoring import score_samples

METRICS = "fid,kid,prdc,diversity,judge"
COLUMNS = [  # (key, header, format)
    ("mean_steps", "mean steps", "{:.0f}"),
    ("energy_gap", "E(x,y) - m_y", "{:+.2f}"),
    ("as_asked", "sampled model: as asked", "{:.1%}"),
    ("judge_accuracy", "judge recognises", "{:.1%}"),
    ("fid", "FID", "{:.2f}"),
    ("kid", "KID", "{:.3f}"),
    ("precision", "precision", "{:.2f}"),
    ("recall", "recall", "{:.2f}"),
    ("density", "density", "{:.2f}"),
    ("coverage", "coverage", "{:.2f}"),
    ("diversity", "diversity", "{:.2f}"),
    ("diversity_pixels", "diversity (pixels)", "{:.2f}"),
    ("nearest_train", "nearest-train", "{:.2f}"),
]


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(len(x), -1).double() / 255.0


def nearest_same_class(x: torch.Tensor, y: torch.Tensor, train_x: torch.Tensor, train_y: torch.Tensor) -> float:
    """Mean pixel distance from each image to the nearest training image of its class."""
    d = []
    for c in torch.unique(y).tolist():
        d.append(torch.cdist(flat(x[y == c]), flat(train_x[train_y == c])).min(1).values)
    return float(torch.cat(d).mean())


def pixel_measures(samples: torch.Tensor, labels: torch.Tensor, ds: Any, real_nearest: float) -> dict[str, float]:
    """Diversity ratio in pixel space and the nearest-training-image distance relative to real test images'."""
    return {
        "diversity_pixels": variety.diversity_ratio(flat(samples), labels, flat(ds.train_x), ds.train_y)["ratio"],
        "nearest_train": nearest_same_class(samples, labels, ds.train_x, ds.train_y) / real_nearest,
    }


def score_config(judge: Path, device: str) -> config_mod.RunConfig:
    """What `weat score --features JUDGE --judge JUDGE --metrics ... --device D` resolves."""
    return config_mod.resolve_command(overrides={"score.features": str(judge), "score.judge": str(judge),
                                                 "score.metrics": METRICS, "score.device": device})


def run_one(model: Path, judge: Path, ds: Any, real_nearest: float, class_energy: torch.Tensor, out_dir: Path, *,
            init: str, steps: int, step_size: float, adaptive: float | None, seed: int, n_per_class: int, device: str,
            sample_only: bool = False) -> dict[str, Any] | None:
    stop = "" if adaptive is None else f"-a{adaptive:g}"
    tag = f"{init}-t{steps}-eta{step_size:g}{stop}-s{seed}"
    done = out_dir / f"{tag}.score.json"  # ({tag}.json is the grid's numbers)
    if done.is_file():
        return json.loads(done.read_text())
    samples, sampled = out_dir / f"{tag}.safetensors", out_dir / f"{tag}.sample.json"
    if not sampled.is_file():
        overrides = {"sample.init": init, "sample.steps": steps, "sample.step_size": step_size, "sample.seed": seed,
                     "sample.n_per_class": n_per_class, "sample.device": device,
                     "sample.adaptive": "off" if adaptive is None else adaptive}
        cfg = config_mod.resolve_command(stored=ckpt_mod.stored_config(model), overrides=overrides)
        t0 = time.perf_counter()
        res = sample_checkpoint(model, cfg, out=samples, grid=out_dir / f"{tag}.png")
        sampled.write_text(json.dumps({"sample_seconds": round(time.perf_counter() - t0, 2),
                                       "as_asked": res.fraction_as_asked}))
    if sample_only:
        return None
    tensors, _ = ckpt_mod.read(samples)
    sc = score_samples(samples, score_config(judge, device)).summary()
    row = {"init": init, "steps": steps, "step_size": step_size, "adaptive": adaptive, "seed": seed,
           "n": len(tensors["labels"]), **json.loads(sampled.read_text()),
           "mean_steps": float(tensors["steps_taken"].double().mean()),
           "energy_gap": float((tensors["energy_final"] - class_energy[tensors["labels"]]).double().mean()),
           **{k: sc[k] for k in ("fid", "kid", "precision", "recall", "density", "coverage", "diversity",
                                 "judge_accuracy", "diversity_per_class")},
           **pixel_measures(tensors["samples"], tensors["labels"], ds, real_nearest),
           "command": (f"weat sample {model} --init {init} --seed {seed} --n-per-class {n_per_class} "
                       f"--sgld-steps {steps} --step-size {step_size:g}"
                       + (" --adaptive off" if adaptive is None else f" --adaptive {adaptive:g}") + f" --out {tag}.safetensors && "
                       f"weat score {tag}.safetensors --features {judge} --judge {judge} --metrics {METRICS} --json")}
    done.write_text(json.dumps(row, indent=1))
    return row


def real_row(model: Path, judge: Path, ds: Any, class_energy: torch.Tensor, out_dir: Path, device: str) -> dict[str, Any]:
    """The real test split scored like the samples (an .npz with labels)."""
    path = out_dir / "digits-test.npz"
    np.savez(path, images=ds.test_x.numpy(), labels=ds.test_y.numpy())
    sc = score_samples(path, score_config(judge, device)).summary()
    m = ckpt_mod.load(model).model
    with torch.no_grad():
        logits = m(ds.test_x.float() / 255)
    as_asked = float((logits.argmax(1) == ds.test_y).double().mean())
    gap = float((joint_energy(logits, ds.test_y) - class_energy[ds.test_y]).double().mean())
    return {"init": "real test split", "steps": None, "step_size": None, "adaptive": None, "n": len(ds.test_y),
            "as_asked": as_asked, "energy_gap": gap,
            **{k: sc[k] for k in ("fid", "kid", "precision", "recall", "density", "coverage", "diversity",
                                  "judge_accuracy")},
            "diversity_pixels": variety.diversity_ratio(flat(ds.test_x), ds.test_y, flat(ds.train_x), ds.train_y)["ratio"],
            "nearest_train": 1.0}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["steps"], r["step_size"], r.get("adaptive")), []).append(r)
    out = []
    for (init, steps, eta, adaptive), rs in groups.items():
        agg: dict[str, Any] = {"init": init, "steps": steps, "step_size": eta, "adaptive": adaptive,
                               "seeds": [r.get("seed") for r in rs]}
        for key, _, _ in COLUMNS + [("sample_seconds", "", "")]:
            vals = [r[key] for r in rs if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
            if vals:
                agg[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
        out.append(agg)
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    head = ["init", "steps", "eta", "adaptive"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["init"], "" if r["steps"] is None else str(r["steps"]),
                 "" if r["steps"] in (None, 0) else f"{r['step_size']:g}",
                 "" if r.get("adaptive") is None else f"{r['adaptive']:g}"]
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            if v is None:
                cells.append("")
                continue
            text = fmt.format(v["mean"])
            if len(r["seeds"]) > 1:
                text += " ± " + fmt.format(v["std"]).rstrip("%")
                text += "%" if fmt.endswith("%}") else ""
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("runs/digits-weat/model.safetensors"))
    ap.add_argument("--judge", type=Path, default=Path("runs/digits-standard/model.safetensors"))
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-size", type=float, default=0.1)
    ap.add_argument("--tune", default="pca-scaled,local-pca", help="inits that also run --tune-settings")
    ap.add_argument("--tune-settings", default="20:0.1,50:0.1,100:0.1,50:0.05,100:0.05,200:0.05,200:0.1:0",
                    help="steps:eta[:adaptive],... (adaptive: stop at the class-mean E(x,y) + this, rule below)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sample-quality"))
    ap.add_argument("--sample-only", action="store_true", help="only draw the samples (no judge needed yet)")
    ap.add_argument("--table", type=Path, default=Path("benchmarks/sample_quality"), help="writes PREFIX.json, PREFIX.md")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    ds = data_mod.load("digits")
    real_nearest = nearest_same_class(ds.test_x, ds.test_y, ds.train_x, ds.train_y)
    with torch.no_grad():  # m_y: the class-mean E(x, y) of the training images (what --adaptive stops at)
        class_energy = class_energy_means(ckpt_mod.load(args.model).model, ds.train_x, ds.train_y, ds.num_classes,
                                          batch_size=500)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    inits = [i for i in args.inits.split(",") if i.strip()]
    plan = [(i, 0, args.step_size, None) for i in inits] + [(i, args.steps, args.step_size, None) for i in inits]
    for init in [i for i in args.tune.split(",") if i.strip()]:
        for item in args.tune_settings.split(","):
            t, eta, *adaptive = item.split(":")
            entry = (init, int(t), float(eta), float(adaptive[0]) if adaptive else None)
            if entry not in plan:
                plan.append(entry)
    rows = []
    t0 = time.perf_counter()
    for init, steps, eta, adaptive in plan:
        for seed in seeds:
            r = run_one(args.model, args.judge, ds, real_nearest, class_energy, args.out, init=init, steps=steps,
                        step_size=eta, adaptive=adaptive, seed=seed, n_per_class=args.n_per_class, device=args.device, sample_only=args.sample_only)
            if r is None:
                print(f"{init:12s} steps {steps:4d} eta {eta:<5g} adaptive {adaptive} seed {seed}: sampled", flush=True)
                continue
            rows.append(r)
            print(f"{init:12s} steps {steps:4d} eta {eta:<5g} adaptive {adaptive} seed {seed}: judge {r['judge_accuracy']:.3f} "
                  f"diversity {r['diversity']:.3f} (pixels {r['diversity_pixels']:.3f}) recall {r['recall']:.3f} "
                  f"coverage {r['coverage']:.3f} FID {r['fid']:.2f} nearest-train {r['nearest_train']:.2f} "
                  f"({r['sample_seconds']:.0f} s)", flush=True)
    if args.sample_only:
        return
    table = aggregate(rows) + aggregate([real_row(args.model, args.judge, ds, class_energy, args.out, args.device)])
    meta = {"model": str(args.model), "judge": str(args.judge), "n_per_class": args.n_per_class, "seeds": seeds,
            "metrics_command": f"weat score SAMPLES --features {args.judge} --judge {args.judge} --metrics {METRICS} --json",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "seconds": round(time.perf_counter() - t0, 1)}
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.with_suffix(".json").write_text(json.dumps({"meta": meta, "table": table, "runs": rows}, indent=1))
    args.table.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
