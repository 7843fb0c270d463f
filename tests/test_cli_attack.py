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
from weatcli.energy import ENERGY_QUANTITIES

DESCRIBE_KEYS = ["mean", "std", "q05", "q25", "q50", "q75", "q95", "n"]  # energy.describe


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_json_has_exactly_the_documented_keys(model_path, capsys):
    code, out, err = run_cli(["attack", str(model_path), "-a", "pgd", "-a", "cw", "--n", "64", "--steps", "5", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)  # stdout is one JSON object and nothing else
    assert list(result) == ["model", "eps", "norm", "n", "clean_accuracy", "attacks", "worst_case_accuracy", "config"]
    assert (result["model"], result["eps"], result["norm"], result["n"]) == (str(model_path), 0.1, "linf", 64)
    assert list(result["attacks"]) == ["pgd", "cw"]
    for a in result["attacks"].values():
        assert set(a) == {"robust_accuracy", "seconds", "energy"} and list(a["energy"]) == list(ENERGY_QUANTITIES)
        assert 0 <= a["robust_accuracy"] <= result["clean_accuracy"] <= 1 and a["seconds"] >= 0
        for d in a["energy"].values():  # the one energy summary schema: energy.summarize
            assert list(d) == DESCRIBE_KEYS and d["n"] == 64
            assert all(isinstance(v, float) for k, v in d.items() if k != "n")
        e = {k: d["mean"] for k, d in a["energy"].items()}
        assert e["delta_energy"] == pytest.approx(e["energy_natural"] - e["energy_adversarial"], abs=1e-6)
    assert set(result["config"]) == {"data", "attack", "evaluate"}
    assert result["config"]["evaluate"]["attacks"] == ["pgd", "cw"] and result["config"]["evaluate"]["steps"] == 5
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
        (["{ckpt}", "--attack", "fgsm"], "--attack (evaluate.attacks): unknown 'fgsm'"),
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


# ----------------------------------------------------------------------------- config: defaults, --set, presets


def test_help_shows_the_config_models_defaults(capsys):
    code, out, err = run_cli(["attack", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())  # rich wraps the help
    for flag, default in (("--steps", 20), ("--restarts", 1), ("--batch-size", 500), ("--target-class", "random"),
                          ("--attack", "pgd"), ("--split", "test"), ("--seed", 0), ("--device", "auto")):
        assert f"[default: {default}]" in text.split(flag, 1)[1].split(" --", 1)[0], flag
    assert "(default: the checkpoint's)" in text.split("--eps", 1)[1]  # the threat: the checkpoint's, not [attack]'s
    assert "--preset" in text and "--set" in text


def test_set_changes_what_runs(model_path, capsys):
    code, out, err = run_cli(["attack", str(model_path), "--n", "16", "--set", "evaluate.attacks=['CW']",
                              "--set", "evaluate.steps=0", "--set", "attack.eps=0.2", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["evaluate"]["attacks"] == ["cw"] and list(result["attacks"]) == ["cw"]
    assert result["config"]["evaluate"]["steps"] == 0 and result["config"]["attack"]["eps"] == result["eps"] == 0.2
    assert result["config"]["attack"]["step_size"] == pytest.approx(0.05)  # the checkpoint's ratio, 1/4
    assert "linf eps 0.2: cw" in err


def test_a_presets_sections_apply_and_flags_win(model_path, tmp_path, capsys):
    preset = tmp_path / "eval.toml"
    preset.write_text('[evaluate]\nn = 12\nsteps = 1\nattacks = ["pgd", "cw"]\n[attack]\neps = "4/255"\n')
    code, out, err = run_cli(["attack", str(model_path), "-p", str(preset), "--steps", "2", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 12 and list(result["attacks"]) == ["pgd", "cw"] and result["eps"] == pytest.approx(4 / 255)
    assert result["config"]["evaluate"]["steps"] == 2  # the flag over the preset
    assert result["config"]["attack"]["steps"] == ckpt.stored_config(model_path).attack.steps  # the rest: stored


@pytest.mark.parametrize("item,needle", [("evaluate.restarts=0", "evaluate.restarts"),
                                         ("evaluate.target_class=most", "evaluate.target_class"),
                                         ("evaluate.attacks=['fgsm']", "evaluate.attacks"),
                                         ("evaluate.nope=1", "evaluate.nope")])
def test_bad_set_value_is_exit_2_naming_the_key(model_path, item, needle, capsys):
    code, out, err = run_cli(["attack", str(model_path), "--set", item, "--json"], capsys)
    assert code == 2 and out == "" and needle in err and len(err.strip().splitlines()) == 1


def test_eps_zero_is_the_clean_accuracy(model_path, capsys):
    code, out, err = run_cli(["attack", str(model_path), "--eps", "0", "-a", "pgd", "-a", "cw", "--n", "32",
                              "--steps", "2", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["eps"] == 0 and result["config"]["attack"]["eps"] == 0
    for a in result["attacks"].values():
        assert a["robust_accuracy"] == result["clean_accuracy"] and a["energy"]["delta_energy"]["mean"] == 0


def test_target_class_implies_targeted(model_path, capsys):
    code, out, err = run_cli(["attack", str(model_path), "--target-class", "3", "--n", "16", "--steps", "2", "--json"],
                             capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["evaluate"]["targeted"] and result["config"]["evaluate"]["target_class"] == "3"
    assert "target_success_rate" in result["attacks"]["pgd"]
