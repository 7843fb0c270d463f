"""`weat import --robustbench NAME`: zoo architectures built through robustbench's own registry, the
user's state dict imported with the zoo model's logits, rebuilt offline by every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from weatcli import checkpoint, config, zoo

@pytest.fixture(scope="module")
def robustbench_available() -> None:
    """Skip unless robustbench imports; checked when a test needs it, not at collection (its import is slow)."""
    if not zoo.available():
        pytest.skip("robustbench is not importable here (optional extra: pip install 'weat[robustbench]')")


needs_robustbench = pytest.mark.usefixtures("robustbench_available")

# Small entries of different families, and the DM-AT WRN-28-10 of the current leaders.
ENTRIES = [
    ("Sehwag2021Proxy_R18", "Linf"),  # ResNet-18 (robustbench's resnet.py)
    ("Rice2020Overfitting", "L2"),  # PreAct ResNet-18 with mu/sigma buffers
    ("Wang2023Better_WRN-28-10", "Linf"),  # DMWideResNet, SiLU
]


def _randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random weights and BN statistics, so equal logits mean every tensor landed in its place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point() and not name.endswith(("mu", "sigma", "mean", "std")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weat: error: "), err
    return lines[0]


_SAVED: dict[str, tuple[Path, torch.nn.Module]] = {}


def _user_file(tmp_path_factory, name: str, threat: str) -> tuple[Path, torch.nn.Module]:
    """The zoo model with random weights, saved as a user's file would be: torch.save(model.state_dict())."""
    if name not in _SAVED:
        torch.manual_seed(0)
        model = _randomised(zoo.build(zoo.entry(name, "cifar10", threat)))
        path = tmp_path_factory.mktemp("zoo") / f"{name}.pt"
        torch.save(model.state_dict(), path)
        _SAVED[name] = (path, model)
    return _SAVED[name]


def _import(capsys, path: Path, name: str, threat: str, *extra: str) -> dict:
    code, out, err = run_cli(["import", str(path), "--robustbench", name, "--dataset", "cifar10", "--threat", threat,
                              "--json", *extra], capsys)
    assert code == 0, err
    return json.loads(out)


@needs_robustbench
@pytest.mark.parametrize(("name", "threat"), ENTRIES)
def test_import_gives_the_zoo_models_logits(tmp_path_factory, capsys, name, threat):
    path, model = _user_file(tmp_path_factory, name, threat)
    summary = _import(capsys, path, name, threat, "--force")
    assert summary["arch"] == f"robustbench:{name}" and summary["robustbench_threat"] == threat
    assert summary["renamed"] == {} and summary["stripped_prefix"] is None
    ck = checkpoint.load(summary["checkpoint"])  # rebuilt through the zoo registry, offline
    meta = ck.metadata
    assert meta["arch"] == f"robustbench:{name}" and meta["robustbench_threat"] == threat
    assert meta["robustbench_dataset"] == "cifar10" and meta["method"] == "imported"
    assert ck.config.model.robustbench_threat == threat and ck.config.data.dataset == "cifar10"
    # The leaderboard's threat unless --eps/--norm say otherwise.
    assert ck.config.attack.norm == ("linf" if threat == "Linf" else "l2")
    assert ck.config.attack.eps == pytest.approx(8 / 255 if threat == "Linf" else 0.5)
    assert type(ck.model) is type(model)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), model(x), rtol=1e-5, atol=1e-5)


@needs_robustbench
def test_attack_runs_on_an_imported_zoo_checkpoint(tmp_path_factory, capsys, cifar10_root):
    name, threat = ENTRIES[0]
    path, _ = _user_file(tmp_path_factory, name, threat)
    out_ckpt = path.with_name("attack-me.weat.safetensors")
    summary = _import(capsys, path, name, threat, "--out", str(out_ckpt), "--force")
    code, out, err = run_cli(["attack", summary["checkpoint"], "--n", "8", "--attack", "pgd", "--steps", "2",
                              "--data-dir", str(cifar10_root), "--device", "cpu", "--batch-size", "8", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 8
    assert 0.0 <= result["attacks"]["pgd"]["robust_accuracy"] <= result["clean_accuracy"] <= 1.0


@needs_robustbench
def test_missing_parameters_or_bn_statistics_are_refused(tmp_path, capsys):
    model = zoo.build(zoo.entry("Sehwag2021Proxy_R18", "cifar10", "Linf"))
    sd = model.state_dict()
    for drop in ("linear.weight", "bn1.running_mean"):
        partial = {k: v for k, v in sd.items() if k != drop}
        src = tmp_path / f"no-{drop}.pt"
        torch.save(partial, src)
        code, out, err = run_cli(["import", str(src), "--robustbench", "Sehwag2021Proxy_R18", "--dataset", "cifar10"],
                                 capsys)
        line = _one_line_error(code, out, err)
        assert drop in line and "--robustbench" in line


@needs_robustbench
def test_normalisation_constants_may_be_absent(tmp_path, capsys):
    """Rice2020Overfitting sets mu/sigma itself; RobustBench's published files lack them."""
    torch.manual_seed(0)
    model = _randomised(zoo.build(zoo.entry("Rice2020Overfitting", "cifar10", "L2")))
    src = tmp_path / "rice.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k not in ("mu", "sigma")}, src)
    summary = _import(capsys, src, "Rice2020Overfitting", "L2")
    assert sorted(summary["filled"]) == ["mu", "sigma"]
    ck = checkpoint.load(summary["checkpoint"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), model(x), rtol=1e-5, atol=1e-5)


@needs_robustbench
@pytest.mark.parametrize(("args", "needle"), [
    (["--robustbench", "Wang2023Better_WRN-28-1"], "did you mean Wang2023Better_WRN-28-10"),
    (["--robustbench", "Sehwag2021Proxy_R18", "--threat", "Linf2"], "--threat"),
    (["--robustbench", "Sehwag2021Proxy_R18", "--mean", "0.5", "--std", "0.5"], "own normalisation"),
    (["--robustbench", "Sehwag2021Proxy_R18", "--arch", "resnet18"], "give one"),
])
def test_bad_zoo_options_are_one_line(tmp_path, capsys, args, needle):
    src = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, src)
    code, out, err = run_cli(["import", str(src), "--dataset", "cifar10", *args], capsys)
    assert needle in _one_line_error(code, out, err)


@needs_robustbench
def test_nothing_is_downloaded_without_download(tmp_path, capsys):
    missing = tmp_path / "Wang2023Better_WRN-28-10.pt"
    code, out, err = run_cli(["import", str(missing), "--robustbench", "Wang2023Better_WRN-28-10",
                              "--dataset", "cifar10"], capsys)
    assert "--download" in _one_line_error(code, out, err)
    assert not missing.exists()


def test_builders_cannot_download():
    import torch.hub

    with zoo._offline():
        with pytest.raises(zoo._DownloadRefused):
            torch.hub.download_url_to_file("https://example.invalid/weights.pth", "/tmp/never")
    assert torch.hub.download_url_to_file is not None and torch.hub.download_url_to_file.__name__ != "refuse"


def test_zoo_options_without_robustbench_name_are_refused(tmp_path, capsys):
    src = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, src)
    for args, needle in ((["--arch", "resnet18", "--threat", "Linf"], "--threat: only with --robustbench"),
                         (["--arch", "resnet18", "--download"], "--download: only with --robustbench"),
                         ([], "--arch: required")):
        code, out, err = run_cli(["import", str(src), "--dataset", "cifar10", *args], capsys)
        assert needle in _one_line_error(code, out, err)


def _zoo_checkpoint_file(tmp_path: Path) -> Path:
    """A checkpoint that names a zoo entry (what weat import --robustbench writes), made without robustbench."""
    cfg = config.resolve(overrides={"data.dataset": "cifar10", "model.arch": "robustbench:Wang2023Better_WRN-28-10",
                                    "model.robustbench_threat": "Linf"})
    meta = checkpoint.model_metadata(cfg, num_classes=10, in_channels=3, image_size=32, epoch=0)
    meta.update({"method": "imported", "robustbench_dataset": "cifar10", "robustbench_threat": "Linf"})
    path = tmp_path / "zoo.safetensors"
    checkpoint.save(path, {"init_conv.weight": torch.zeros(16, 3, 3, 3)}, meta)
    return path


def test_without_robustbench_the_install_command_is_named(tmp_path, capsys, monkeypatch, cifar10_root):
    real = zoo._find_spec
    monkeypatch.setattr(zoo, "_find_spec", lambda name: None if name == "robustbench" else real(name))
    src = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, src)
    code, out, err = run_cli(["import", str(src), "--robustbench", "Wang2023Better_WRN-28-10", "--dataset", "cifar10"],
                             capsys)
    assert "pip install 'weat[robustbench]'" in _one_line_error(code, out, err)
    # Every command that loads such a checkpoint says the same (exit 2), e.g. weat attack.
    code, out, err = run_cli(["attack", str(_zoo_checkpoint_file(tmp_path)), "--n", "2", "--data-dir",
                              str(cifar10_root), "--device", "cpu"], capsys)
    line = _one_line_error(code, out, err)
    assert "pip install 'weat[robustbench]'" in line and "zoo.safetensors" in line


@needs_robustbench
def test_energy_and_sample_run_on_an_imported_zoo_checkpoint(tmp_path_factory, capsys, cifar10_root, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("WEAT_CACHE_DIR", str(tmp_path / "cache"))
    name, threat = ENTRIES[0]
    path, _ = _user_file(tmp_path_factory, name, threat)
    summary = _import(capsys, path, name, threat, "--out", str(tmp_path / "zoo.safetensors"))
    code, out, err = run_cli(["energy", "stats", summary["checkpoint"], "-a", "pgd", "--n", "8", "--steps", "1",
                              "--data-dir", str(cifar10_root), "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 8
    code, out, err = run_cli(["sample", summary["checkpoint"], "--n-per-class", "1", "--classes", "0,5", "--sgld-steps",
                              "2", "--device", "cpu", "--init", "uniform", "--out", str(tmp_path / "s.safetensors"),
                              "--data-dir", str(cifar10_root)], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "s.safetensors")


@needs_robustbench
def test_download_lets_robustbench_fetch_the_file_first(tmp_path, capsys, monkeypatch):
    """--download hands the fetch to robustbench's own load_model (replaced here: no network in tests),
    writes its state dict to FILE, then imports FILE like any other."""
    import robustbench.utils

    name = "Sehwag2021Proxy_R18"
    torch.manual_seed(0)
    published = _randomised(zoo.build(zoo.entry(name, "cifar10", "Linf")), seed=3)
    calls = []

    def fake_load_model(model_name, model_dir, dataset, threat_model):
        calls.append((model_name, Path(model_dir), dataset, threat_model))
        return published

    monkeypatch.setattr(robustbench.utils, "load_model", fake_load_model)
    monkeypatch.setenv("WEAT_CACHE_DIR", str(tmp_path / "cache"))
    dest = tmp_path / "fetched.pt"
    summary = _import(capsys, dest, name, "Linf", "--download")
    assert calls == [(name, tmp_path / "cache" / "robustbench", "cifar10", "Linf")]
    assert dest.is_file() and summary["source"] == str(dest)
    ck = checkpoint.load(summary["checkpoint"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), published(x), rtol=1e-5, atol=1e-5)
    # An existing FILE is imported as it is: nothing is fetched again.
    _import(capsys, dest, name, "Linf", "--download", "--force")
    assert len(calls) == 1
