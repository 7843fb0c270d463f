"""`weat attack`: its JSON contract, --save-adv, the default checkpoint, --state and bad input."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors import safe_open

from conftest import run_cli, trained_checkpoint, write_cifar10
from weatcli import checkpoint as ckpt

ENERGY_KEYS = {"natural_mean", "natural_std", "adversarial_mean", "adversarial_std", "delta_mean",
               "joint_natural_mean", "joint_adversarial_mean", "joint_delta_mean"}


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_json_has_exactly_the_documented_keys(model_path, capsys):
    code, out, err = run_cli(["attack", str(model_path), "-a", "pgd", "-a", "cw", "--n", "64", "--steps", "5", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)  # stdout is one JSON object and nothing else
    assert list(result) == ["model", "eps", "norm", "n", "clean_accuracy", "attacks", "worst_case_accuracy"]
    assert (result["model"], result["eps"], result["norm"], result["n"]) == (str(model_path), 0.1, "linf", 64)
    assert list(result["attacks"]) == ["pgd", "cw"]
    for a in result["attacks"].values():
        assert set(a) == {"robust_accuracy", "seconds", "energy"} and set(a["energy"]) == ENERGY_KEYS
        assert 0 <= a["robust_accuracy"] <= result["clean_accuracy"] <= 1 and a["seconds"] >= 0
        assert all(isinstance(v, float) for v in a["energy"].values())
    assert result["worst_case_accuracy"] <= min(a["robust_accuracy"] for a in result["attacks"].values())
    assert "pgd: robust accuracy" in err and "cw: robust accuracy" in err  # progress and logs on stderr


def test_table_on_stdout(model_path, capsys):
    code, out, err = run_cli(["attack", str(model_path), "--n", "32", "--steps", "2", "--eps", "8/255"], capsys)
    assert code == 0, err
    assert "pgd" in out and "clean" in out and "E(x*)" in out and "eps=0.0313725" in out
    assert "attacking" not in out and "attacking" in err


def test_save_adv_round_trip(model_path, tmp_path, capsys):
    path = tmp_path / "adv.safetensors"
    code, out, err = run_cli(["attack", str(model_path), "-a", "pgd", "-a", "cw", "--n", "48", "--steps", "5",
                          "--batch-size", "20", "--targeted", "--save-adv", str(path), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "weat-adv/1" and meta["model"] == str(model_path) and meta["norm"] == "linf"
    assert float(meta["eps"]) == 0.1 and set(json.loads(meta["attacks"])) == {"pgd", "cw"}
    assert tensors["x"].shape == (48, 1, 16, 16) and tensors["x"].dtype == torch.float32
    assert tensors["y"].shape == (48,) and tensors["energy_natural"].shape == (48,)
    model = ckpt.load(model_path).model
    with torch.no_grad():
        nat = model(tensors["x"])
        for name in ("pgd", "cw"):
            x_adv = tensors[f"{name}/x_adv"]
            assert x_adv.shape == (48, 1, 16, 16) and x_adv.dtype == torch.float32
            assert ((x_adv - tensors["x"]).abs() <= 0.1 + 1e-6).all()
            adv = model(x_adv)
            robust = (nat.argmax(1) == tensors["y"]) & (adv.argmax(1) == tensors["y"])
            assert robust.sum().item() / 48 == result["attacks"][name]["robust_accuracy"]
            torch.testing.assert_close(tensors[f"{name}/energy_adversarial"], -torch.logsumexp(adv, 1), atol=1e-4, rtol=0)
            assert tensors[f"{name}/target"].shape == (48,)
            assert "target_success_rate" in result["attacks"][name]
    assert not list(tmp_path.glob(".adv.safetensors.*"))  # atomic write left no temp file


def test_default_checkpoint_is_the_newest_run(model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["attack", "--n", "8"], capsys)
    assert code == 2 and out == "" and "weat train" in err and len(err.strip().splitlines()) == 1
    for i, name in enumerate(("old", "new")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(model_path, tmp_path / "runs" / name / "model.safetensors")
        stamp = time.time() - 100 + 50 * i
        os.utime(tmp_path / "runs" / name / "model.safetensors", (stamp, stamp))
    code, out, err = run_cli(["attack", "--n", "8", "--steps", "1", "--json"], capsys)
    assert code == 0, err
    newest = os.path.join("runs", "new", "model.safetensors")
    assert json.loads(out)["model"] == newest and f"using the newest checkpoint {newest}" in err


def test_state_file_resumes(model_path, tmp_path, capsys):
    argv = ["attack", str(model_path), "--n", "40", "--steps", "3", "--batch-size", "16",
            "--state", str(tmp_path / "state.safetensors"), "--json"]
    code, first, err = run_cli(argv, capsys)
    assert code == 0 and "resuming" not in err
    code, second, err = run_cli(argv, capsys)
    assert code == 0 and "resuming" in err
    assert json.loads(first) == json.loads(second)
    code, out, err = run_cli(argv[:-1] + ["--eps", "0.2", "--json"], capsys)
    assert code == 2 and out == "" and "--state" in err and "eps" in err


def test_probability_outputs_are_warned_about(model_path, monkeypatch, capsys):
    real_load = ckpt.load

    def load_softmax(path, device="cpu"):
        c = real_load(path, device)
        c.model = torch.nn.Sequential(c.model, torch.nn.Softmax(dim=1))
        return c

    monkeypatch.setattr(ckpt, "load", load_softmax)
    code, out, err = run_cli(["attack", str(model_path), "--n", "16", "--steps", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["n"] == 16
    assert "weat: warning: model outputs look like probabilities" in err


@pytest.fixture(scope="session")
def foreign_files(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("foreign")
    (root / "garbage.safetensors").write_bytes(b"not a checkpoint")
    save_file({"w": torch.zeros(2)}, str(root / "other.safetensors"), metadata={"format": "pt"})
    write_cifar10(root / "data")
    return root


@pytest.mark.parametrize(
    "args,needle",
    [
        (["{root}/missing.safetensors"], "not found"),
        (["{root}/garbage.safetensors"], "not a readable safetensors"),
        (["{root}/other.safetensors"], "not a weat checkpoint"),
        (["{ckpt}", "--attack", "fgsm"], "--attack: unknown 'fgsm'"),
        (["{ckpt}", "--eps", "-1/255"], "--eps"),
        (["{ckpt}", "--eps", "2"], "--eps"),
        (["{ckpt}", "--eps", "abc"], "--eps"),
        (["{ckpt}", "--step-size", "1/0"], "--step-size"),
        (["{ckpt}", "--norm", "l3"], "--norm"),
        (["{ckpt}", "--norm", "l2"], "--eps: required"),
        (["{ckpt}", "--n", "100000"], "--n: 100000"),
        (["{ckpt}", "--n", "0"], "--n"),
        (["{ckpt}", "--steps", "-1"], "--steps"),
        (["{ckpt}", "--restarts", "0"], "--restarts"),
        (["{ckpt}", "--batch-size", "0"], "--batch-size"),
        (["{ckpt}", "--split", "val"], "--split"),
        (["{ckpt}", "--target-class", "12"], "--target-class"),
        (["{ckpt}", "--device", "gpu"], "--device"),
        (["{ckpt}", "--save-adv", "{root}/no/such/dir/adv.safetensors"], "--save-adv"),
        (["{ckpt}", "--dataset", "cifar10", "--data-dir", "{root}/data"], "--dataset: cifar10 has channels 3"),
        (["{ckpt}", "--dataset", "mnist"], "dataset: unknown 'mnist'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, model_path, foreign_files, capsys):
    argv = ["attack"] + [a.format(root=foreign_files, ckpt=model_path) for a in args] + ["--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
