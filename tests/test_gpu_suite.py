"""benchmarks/gpu_suite.py stays runnable between the rare GPU sessions: `--device cpu --quick`
runs every part at toy sizes through the same code the GPU run uses and writes the same JSON and
summary; overruns, failures and pytest's output are handled as the GPU run needs them handled."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def test_quick_suite_on_the_cpu_gives_every_figure_or_its_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WEAT_TEST_DEVICE", "OUT")}  # the cuda tier skips here
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    parts = [p.name for p in gpu_suite.PARTS]
    if importlib.util.find_spec("torchattacks") is None:  # bench_attack's baseline; the GPU run gets it from .whl/
        parts.remove("pgd")
    # --total: generous, so that a busy machine does not cut parts short (the suite's default is 240 s).
    r = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--quick", "--out", str(tmp_path),
                        "--parts", ",".join(parts), "--profile", "throughput", "--total", "900"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-suite.json", "gpu-suite.md"]  # no temp files left
    data = json.loads((tmp_path / "gpu-suite.json").read_text())
    assert {"device", "torch", "date", "tests", "figures", "errors", "parts", "targets", "profiles"} <= set(data)
    assert data["device"] and data["torch"] and data["quick"] is True
    tests = data["tests"]
    assert tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= 15 and tests["complete"]  # no CUDA here
    figures, errors = data["figures"], data["errors"]
    for name in gpu_suite.REQUIRED_FIGURES:
        if name.startswith("pgd_") and "pgd" not in parts:
            continue
        value = figures[name]
        assert (isinstance(value, float) and math.isfinite(value)) or name in errors, name
    # What needs nothing beyond the project ran to a figure (pgd needs torchattacks; the fraction of
    # peak and peak memory exist on CUDA only).
    for name in ("train_step_ratio", "epoch_seconds", "sgld_10k_200_seconds", "cli_epoch_seconds",
                 "single_step_30_epochs_seconds"):
        assert isinstance(figures[name], float) and figures[name] > 0, (name, errors.get(name))
    assert "CUDA only" in errors["peak_memory_ratio"] and "no dense peak" in errors["bf16_peak_fraction"]
    assert list(data["parts"]) == parts
    for name, part in data["parts"].items():
        assert part["status"] in ("ok", "failed", "timeout") and (part["status"] == "ok" or name in errors), name
    assert all(t["met"] is None for t in data["targets"].values())  # GPU targets are not judged on a CPU
    profile = data["profiles"]["pgd_bf16"]
    assert profile["top_ops"] and profile["top_ops"][0]["self_cpu_us"] > 0 and "Name" in profile["table"]
    md = (tmp_path / "gpu-suite.md").read_text()
    assert "| `train_step_ratio` |" in md and "skipped" in md and "## Profiles" in md


def test_an_overrunning_part_is_stopped_with_its_output_kept():
    code = "import time, subprocess, sys; print('started', flush=True); " \
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    out = gpu_suite.run_logged("slow", [sys.executable, "-c", code], timeout=3, env=dict(os.environ))
    assert out.status == "timeout" and out.seconds < 20 and "started" in out.tail
    out = gpu_suite.run_logged("bad", [sys.executable, "-c", "raise ValueError('boom')"], timeout=30, env=dict(os.environ))
    assert out.status == "failed" and out.returncode == 1 and gpu_suite._error_line(out) == "ValueError: boom"


def test_pytest_output_is_counted_whole_or_partial():
    lines = ["tests/test_cuda.py::test_a[x] PASSED                              [ 33%]",
             "tests/test_cuda.py::test_b SKIPPED (CUDA only)                   [ 66%]",
             "tests/test_cuda.py::test_c FAILED                                [100%]",
             "FAILED tests/test_cuda.py::test_c - AssertionError: 3% of the pixels differ"]
    partial = gpu_suite.parse_pytest(lines)
    assert (partial["passed"], partial["failed"], partial["skipped"], partial["complete"]) == (1, 1, 1, False)
    assert partial["failures"] == [lines[-1]]
    whole = gpu_suite.parse_pytest(lines + ["=========== 1 failed, 19 passed, 2 skipped, 1 error in 95.31s (0:01:35) ==========="])
    assert (whole["passed"], whole["failed"], whole["skipped"], whole["errors"], whole["complete"]) == (19, 1, 2, 1, True)


@pytest.mark.parametrize("figures,cuda,met,badly", [
    ({"train_step_ratio": 6.0, "epoch_seconds": 20.0}, True, {"train_step_ratio": True, "epoch_seconds": False},
     {"train_step_ratio": False, "epoch_seconds": True}),
    ({"train_step_ratio": 4.0, "epoch_seconds": 10.0}, True, {"train_step_ratio": False, "epoch_seconds": False},
     {"train_step_ratio": False, "epoch_seconds": False}),
    ({"train_step_ratio": 6.0, "epoch_seconds": None}, False, {"train_step_ratio": None, "epoch_seconds": None},
     {"train_step_ratio": None, "epoch_seconds": None}),
])
def test_targets_and_what_gets_profiled(figures, cuda, met, badly):
    judged = gpu_suite.judge(figures, cuda)
    assert {k: judged[k]["met"] for k in met} == met and {k: judged[k]["badly_missed"] for k in badly} == badly
    kinds = gpu_suite.profiles_wanted({"targets": judged}, "auto", ran=["train_step", "epoch"])
    assert kinds == (["train_step"] if any(badly.values()) else [])
