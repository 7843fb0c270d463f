"""Helpers shared by the GPU-oriented benchmarks (bench_throughput, bench_epoch, bench_sgld_throughput):
device description, dense peak TFLOP/s by GPU name, synchronised timing, peak memory, JSON output.

Imported as a sibling module: `python benchmarks/<script>.py` puts benchmarks/ first on sys.path.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets (sparse figures
# halved). "fp32" is the non-tensor-core FP32 rate; "tf32" is what cuDNN convolutions in fp32 run
# at while cudnn.allow_tf32 is on (PyTorch's default). First match wins, so specific names come
# before general ones ("H100 PCIe" before "H100").
PEAK_TFLOPS: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("H200", "NVL"), "H200 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (("H200",), "H200 SXM", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (("H100", "PCIE"), "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (("H100", "NVL"), "H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (("H100",), "H100 SXM", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (("A100",), "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]

# Issue #6's anchor: ~2.2 GFLOP per ResNet-18 PGD image-step, ~790 TFLOP/s bf16 on an H100
# => ~356k image-steps/s; the target is >= 35% of that limit.
ISSUE_H100_BF16_TFLOPS = 790.0
ISSUE_TARGET_FRACTION = 0.35


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cudnn_tf32() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch prefers cudnn.conv.fp32_precision; the flag still reads
        return bool(torch.backends.cudnn.allow_tf32)


def peak_table_entry(device: torch.device) -> tuple[str | None, dict[str, float] | None]:
    """(label, {precision: TFLOP/s}) of the GPU, or (None, None) for a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device).upper()
    for needles, label, peaks in PEAK_TFLOPS:
        if all(n in name for n in needles):
            return label, peaks
    return None, None


def parse_peak_override(text: str | None) -> dict[str, float] | None:
    """--peak-tflops: one number for every precision, or `bf16=989,fp32=494`."""
    if not text:
        return None
    if "=" not in text:
        v = float(text)
        return {"bf16": v, "fp32": v, "tf32": v}
    out: dict[str, float] = {}
    for part in text.split(","):
        k, v = part.split("=", 1)
        out[k.strip()] = float(v)
    if "fp32" in out and "tf32" not in out:
        out["tf32"] = out["fp32"]
    return out


def peak_for(precision: str, device: torch.device, override: dict[str, float] | None) -> tuple[float | None, str | None]:
    """(dense peak TFLOP/s for `precision`, how it was chosen); (None, None) when unknown."""
    label, table = peak_table_entry(device)
    source = "--peak-tflops" if override else label
    peaks = override or table
    if not peaks:
        return None, None
    if precision == "fp32":
        # fp32 convolutions run as TF32 on tensor cores unless the user turned it off.
        key = "tf32" if device.type == "cuda" and cudnn_tf32() and "tf32" in peaks else "fp32"
    else:
        key = precision
    if key not in peaks:
        return None, None
    return peaks[key], f"{source} {key}"


def reset_peak_memory(device: torch.device) -> int | None:
    """Resets the peak counter; returns the bytes allocated now (the baseline of the next peak)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "loadavg_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu_memory_bytes=props.total_memory,
                   sm_count=props.multi_processor_count, cudnn_allow_tf32=cudnn_tf32(),
                   matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return env


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"
