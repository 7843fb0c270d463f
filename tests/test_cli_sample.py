"""`weat sample` and `weat score` on the command line: flags reach the engines, stdout carries the
samples path (or one JSON object), bad input is one line and exit 2, and the documented pipeline
`weat score "$(weat sample CKPT)"` works, in-process and through a real shell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, robust_checkpoint
from weatcli import cli, sampling, scoring




@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return robust_checkpoint(tmp_path_factory)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WEAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WEAT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(scoring, "CLEANFID_DIR", tmp_path / "no-cleanfid")


def small(tmp_path, *extra):
    return ["--n-per-class", "2", "--classes", "0,5", "--sgld-steps", "4", "--device", "cpu", "--init", "uniform",
            "--out", str(tmp_path / "s.safetensors"), *extra]


def test_sample_prints_the_samples_path_and_writes_the_grid(model_path, tmp_path, capsys):
    code, out, err = run_cli(["sample", str(model_path), *small(tmp_path)], capsys)
    assert code == 0 and out == f"{tmp_path / 's.safetensors'}\n"
    assert (tmp_path / "s.png").is_file() and "classified as asked" in err


def test_sample_json(model_path, tmp_path, capsys):
    code, out, _ = run_cli(["sample", str(model_path), *small(tmp_path, "--grid", str(tmp_path / "g.png"), "--json")], capsys)
    s = json.loads(out)
    assert code == 0 and s["n"] == 4 and 0 <= s["fraction_classified_as_asked"] <= 1
    assert {"seconds", "energy_final_mean", "files"} <= set(s) and s["files"]["grid"] == str(tmp_path / "g.png")


def test_sample_flags_reach_the_engine(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(**kw):
        seen.update(kw)
        torch = sampling.torch
        one, zero = torch.zeros(1, dtype=torch.long), torch.zeros(1)
        return sampling.SampleResult(samples=torch.zeros(1, 1, 2, 2, dtype=torch.uint8), labels=one, predictions=one,
                                     energy_initial=zero, energy_final=zero, steps_taken=one, seconds=0.0,
                                     settings={k: None for k in ("checkpoint", "init", "steps", "step_size", "momentum",
                                                                 "noise", "alpha", "seed")},
                                     files={"samples": "x.safetensors", "grid": "x.png"})

    monkeypatch.setattr(sampling, "sample_checkpoint", fake)
    code, out, _ = run_cli(["sample", "m.safetensors", "--sgld-steps", "30", "--n", "7", "--classes", "1,2", "--init", "pca",
                        "--step-size", "1/20", "--momentum", "0.8", "--noise", "0.01", "--alpha", "1", "--pca-variance",
                        "0.95", "--pca-sigma", "0.02", "--adaptive", "0.5", "--seed", "3"], capsys)
    assert code == 0 and out == "x.safetensors\n"
    assert seen["checkpoint"] == Path("m.safetensors") and (seen["steps"], seen["n"], seen["classes"]) == (30, 7, "1,2")
    assert seen["step_size"] == pytest.approx(0.05) and (seen["momentum"], seen["noise"], seen["alpha"]) == (0.8, 0.01, 1.0)
    assert (seen["init"], seen["pca_variance"], seen["pca_sigma"], seen["adaptive"], seen["seed"]) == ("pca", 0.95, 0.02, 0.5, 3)
    seen.clear()
    assert run_cli(["sample", "m.safetensors"], capsys)[0] == 0
    assert "step_size" not in seen  # unset: the engine's default applies


def test_cli_defaults_are_the_engines(monkeypatch, capsys):
    """The CLI spells its defaults out (torch stays unimported for --help): they must match the engine's."""
    import inspect

    engine = inspect.signature(sampling.sample_checkpoint).parameters
    command = inspect.signature(cli.sample).parameters
    pairs = {"sgld_steps": "steps", "init": "init", "momentum": "momentum", "noise": "noise", "pca_variance": "pca_variance",
             "pca_sigma": "pca_sigma", "init_noise": "init_noise_std", "batch_size": "batch_size", "seed": "seed"}
    for flag, param in pairs.items():
        assert command[flag].default == engine[param].default, flag
    assert f"default {sampling.DEFAULT_STEP_SIZE:g})" in run_cli(["sample", "--help"], capsys)[1]
    assert f"default {sampling.DEFAULT_N_PER_CLASS})" in run_cli(["sample", "--help"], capsys)[1]


def test_sample_without_checkpoint_uses_the_newest_run(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["sample", *small(tmp_path)], capsys)
    assert code == 2 and "weat train" in err and len(err.strip().splitlines()) == 1
    for name in ("old", "new"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(model_path, tmp_path / "runs" / name / "model.safetensors")
    os.utime(tmp_path / "runs" / "old" / "model.safetensors", (1, 1))
    code, out, err = run_cli(["sample", *small(tmp_path)], capsys)
    assert code == 0 and f"using the newest checkpoint {Path('runs/new/model.safetensors')}" in err
    assert out.strip() == str(tmp_path / "s.safetensors")


@pytest.mark.parametrize("args,message", [
    (["--classes", "0,10"], "--classes: class 10 out of range"),
    (["--init", "gan"], "--init: unknown 'gan'"),
    (["--sgld-steps", "-1"], "--sgld-steps: -1"),
    (["--step-size", "1/0"], "--step-size"),
])
def test_sample_bad_input_is_one_line_and_exit_2(model_path, tmp_path, capsys, args, message):
    code, out, err = run_cli(["sample", str(model_path), "--device", "cpu", "--out", str(tmp_path / "s.safetensors"), *args],
                         capsys)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_pipeline_sample_then_score_with_classifier_features(model_path, tmp_path, capsys):
    code, path, _ = run_cli(["sample", str(model_path), *small(tmp_path, "--n-per-class", "5")], capsys)
    assert code == 0
    code, out, _ = run_cli(["score", path.strip(), "--features", str(model_path), "--device", "cpu", "--json"], capsys)
    s = json.loads(out)
    assert code == 0 and {"fid", "kid", "is_mean", "is_std", "n", "reference", "features"} <= set(s)
    assert s["n"] == 10 and s["reference"].startswith("digits:train") and s["comparable_with_inception"] is False
    code, out, _ = run_cli(["score", path.strip(), "--features", str(model_path), "--device", "cpu", "--metrics", "is"], capsys)
    assert code == 0 and "│ IS" in out and "│ FID" not in out and "not comparable" in out


def test_score_offline_without_inception_weights_exits_2_naming_the_file(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    code, out, err = run_cli(["score", str(tmp_path / "x.npz"), "--ref", str(tmp_path / "x.npz")], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert scoring.INCEPTION_FILE in err and scoring.INCEPTION_URL in err


@pytest.mark.parametrize("make,message", [
    (lambda p: np_save(p, (3, 5, 8, 8)), "SAMPLES: "),
    (lambda p: None, "not found"),
])
def test_score_bad_samples_exit_2(tmp_path, capsys, make, message):
    make(tmp_path / "bad.npz")
    code, out, err = run_cli(["score", str(tmp_path / "bad.npz"), "--features", "inception"], capsys)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def np_save(path, shape):
    import numpy as np

    np.savez(path, samples=np.zeros(shape, np.uint8))


def test_shell_pipeline(model_path, tmp_path):
    """The documented one-liner, through a real shell: stdout of `weat sample` is exactly the path."""
    weat = f"{sys.executable} -m weatcli"
    line = (f'{weat} score "$({weat} sample {model_path} --n-per-class 3 --sgld-steps 3 --init uniform --device cpu '
            f'--out {tmp_path / "p.safetensors"})" --features {model_path} --metrics is --device cpu --json')
    env = {**os.environ, "WEAT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["n"] == 30 and 1.0 <= s["is_mean"] <= 10.0 and s["fid"] is None and s["kid"] is None
