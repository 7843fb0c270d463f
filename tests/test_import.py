"""`weat import`: foreign state dicts become weat checkpoints with the same logits; pickles never run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from weatcli import checkpoint, data
from weatcli.models import NormalizedModel, build


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights and BN statistics, so equal logits mean every tensor landed in its place."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def digits_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomised(build("small-cnn", num_classes=10, in_channels=1, image_size=16))


def _logits(model: torch.nn.Module, shape=(1, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return x, model.eval()(x)


def _assert_same_logits(path: Path, model: torch.nn.Module, shape=(1, 16, 16)) -> checkpoint.Checkpoint:
    ck = checkpoint.load(path)
    x, want = _logits(model, shape)
    with torch.no_grad():
        got = ck.model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    return ck


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("weat: error: "), err
    return lines[0]


def _import(capsys, *args: str):
    return run_cli(["import", *map(str, args)], capsys)


# ----------------------------------------------------------------------------- layouts that import


@pytest.mark.parametrize("layout", ["plain", "module-prefix", "state_dict", "model_state_dict+module", "net", "legacy"])
def test_import_reproduces_logits(tmp_path, capsys, digits_net, layout):
    sd = digits_net.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    obj = {
        "plain": sd,
        "module-prefix": prefixed,
        "state_dict": {"state_dict": sd, "epoch": 7, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
        "model_state_dict+module": {"model_state_dict": prefixed, "best_acc": 0.5},
        "net": {"net": sd},
        "legacy": sd,
    }[layout]
    src = tmp_path / "theirs.pt"
    torch.save(obj, src, _use_new_zipfile_serialization=layout != "legacy")

    code, out, err = _import(capsys, src, "--arch", "small-cnn", "--dataset", "digits")
    assert code == 0, err
    dst = tmp_path / "theirs.weat.safetensors"  # the default --out
    assert out.strip().splitlines()[-1] == str(dst)
    assert "imported 20 tensors" in err
    ck = _assert_same_logits(dst, digits_net)
    assert ck.metadata["method"] == "imported" and ck.metadata["imported_from"] == "theirs.pt"
    assert ck.config.model.arch == "small-cnn" and ck.config.data.dataset == "digits"
    assert ck.config.model.mean is None and ck.config.model.std is None  # RobustBench: no normalisation


def test_plain_safetensors_and_json(tmp_path, capsys, digits_net):
    src = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in digits_net.state_dict().items()}, str(src))
    dst = tmp_path / "out.safetensors"
    code, out, err = _import(capsys, src, "--arch", "small-cnn", "--dataset", "digits", "--out", dst, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["checkpoint"] == str(dst) and summary["source_format"] == "safetensors"
    assert summary["tensors"] == 20
    assert summary["parameters"] == sum(p.numel() for p in digits_net.parameters())
    assert (summary["num_classes"], summary["in_channels"], summary["image_size"]) == (10, 1, 16)
    _assert_same_logits(dst, digits_net)

    # A weat checkpoint is not imported again: it is used directly.
    line = _one_line_error(*_import(capsys, dst, "--arch", "small-cnn", "--dataset", "digits",
                                    "--out", tmp_path / "again.safetensors"))
    assert "already a weat checkpoint" in line


def test_missing_num_batches_tracked_is_fine(tmp_path, capsys, digits_net):
    sd = {k: v for k, v in digits_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    code, _, err = _import(capsys, tmp_path / "old.pt", "--arch", "small-cnn", "--dataset", "digits")
    assert code == 0, err
    _assert_same_logits(tmp_path / "old.weat.safetensors", digits_net)


def test_resnet18_key_names(tmp_path, capsys):
    """The paper's (kuangliu) ResNet-18 names are ours; fc / downsample spellings are mapped."""
    torch.manual_seed(0)
    net = _randomised(build("resnet18", num_classes=10, in_channels=3, image_size=32))
    sd = net.state_dict()
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
            "layer2.0.shortcut.1.running_var", "linear.weight", "linear.bias"} <= set(sd)
    renamed = {k.replace("linear.", "fc.").replace(".shortcut.", ".downsample."): v for k, v in sd.items()}
    assert "fc.weight" in renamed and "layer3.0.downsample.0.weight" in renamed
    src = tmp_path / "paper.pth"
    torch.save({"model": {f"module.{k}": v for k, v in renamed.items()}}, src)
    code, out, err = _import(capsys, src, "--arch", "resnet18", "--dataset", "cifar10", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["renamed"] == {"fc -> linear": 2, "downsample -> shortcut": 18}  # 3 stages x (conv + 5 BN tensors)
    assert summary["unwrapped"] == "model" and summary["stripped_prefix"] == "module."
    ck = _assert_same_logits(Path(summary["checkpoint"]), net, shape=(3, 32, 32))
    assert ck.config.attack.threat == "linf:0.0313725"  # cifar10's recipe: 8/255


def test_mean_std_recorded_and_applied(tmp_path, capsys, digits_net):
    torch.save(digits_net.state_dict(), tmp_path / "n.pt")
    code, out, err = _import(capsys, tmp_path / "n.pt", "--arch", "small-cnn", "--dataset", "digits",
                             "--mean", "0.5", "--std", "0.25", "--eps", "0.2")
    assert code == 0, err
    ck = checkpoint.load(out.strip())
    assert ck.config.model.mean == [0.5] and ck.config.model.std == [0.25]
    assert ck.config.attack.eps == pytest.approx(0.2)
    normalized = NormalizedModel(digits_net, build("small-cnn", num_classes=10, in_channels=1, image_size=16,
                                                   mean=[0.5], std=[0.25]).normalize)
    _assert_same_logits(Path(out.strip()), normalized)

    # A weat NormalizedModel's own state dict brings its normalisation along.
    torch.save(ck.model.state_dict(), tmp_path / "weat_export.pt")
    code, out, err = _import(capsys, tmp_path / "weat_export.pt", "--arch", "small-cnn", "--dataset", "digits")
    assert code == 0, err
    assert checkpoint.load(out.strip()).config.model.mean == [0.5]
    _assert_same_logits(Path(out.strip()), normalized)

    line = _one_line_error(*_import(capsys, tmp_path / "weat_export.pt", "--arch", "small-cnn", "--dataset", "digits",
                                    "--mean", "0.4", "--std", "0.25", "--out", tmp_path / "x.safetensors"))
    assert "differ from the file's normalize.mean/std" in line
    line = _one_line_error(*_import(capsys, tmp_path / "n.pt", "--arch", "small-cnn", "--dataset", "digits",
                                    "--mean", "0.5", "--out", tmp_path / "x.safetensors"))
    assert "--mean/--std" in line
    line = _one_line_error(*_import(capsys, tmp_path / "n.pt", "--arch", "small-cnn", "--dataset", "digits",
                                    "--norm", "l2", "--out", tmp_path / "x.safetensors"))
    assert "--eps" in line


def test_weat_attack_runs_on_import(tmp_path, capsys, digits_net):
    torch.save(digits_net.state_dict(), tmp_path / "a.pt")
    code, out, err = _import(capsys, tmp_path / "a.pt", "--arch", "small-cnn", "--dataset", "digits")
    assert code == 0, err
    code, out, err = run_cli(["attack", out.strip(), "--n", "16", "--steps", "2", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 16 and 0 <= result["attacks"]["pgd"]["robust_accuracy"] <= result["clean_accuracy"] <= 1


def test_imported_checkpoint_says_imported(tmp_path, capsys, digits_net):
    """The config of an import carries its dataset recipe's train.method (weat-adv for digits); every
    method shown comes from Checkpoint.method, which says "imported"."""
    from weatcli import config as config_mod
    from weatcli.attack_checkpoint import evaluate_checkpoint

    torch.save(digits_net.state_dict(), tmp_path / "a.pt")
    code, out, err = _import(capsys, tmp_path / "a.pt", "--arch", "small-cnn", "--dataset", "digits")
    assert code == 0, err
    path = out.strip()
    ck = checkpoint.load(path)
    recipe = ck.config.train.method
    assert recipe == "weat-adv" and ck.method == "imported"

    cfg = config_mod.resolve_command(stored=checkpoint.stored_config(path), overrides={
        "evaluate.n": 8, "evaluate.steps": 1, "evaluate.device": "cpu"})
    ev = evaluate_checkpoint(path, cfg)
    assert ev.info["method"] == "imported"
    code, out, err = run_cli(["attack", path, "--n", "8", "--steps", "1", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert recipe not in out + err  # no output claims the recipe's method for an imported model


def test_trained_checkpoint_method_is_its_own(tmp_path):
    from weatcli.config import resolve

    cfg = resolve(preset="digits-trades")
    model = build(cfg.model.arch, num_classes=10, in_channels=1, image_size=16)
    meta = checkpoint.model_metadata(cfg, num_classes=10, in_channels=1, image_size=16, epoch=1)
    checkpoint.save(tmp_path / "m.safetensors", checkpoint.state_dict_of(model), meta)
    assert checkpoint.load(tmp_path / "m.safetensors").method == "trades"
    del meta["method"]  # a checkpoint without the key: its config's method
    checkpoint.save(tmp_path / "m.safetensors", checkpoint.state_dict_of(model), meta)
    assert checkpoint.load(tmp_path / "m.safetensors").method == "trades"


def test_dataset_shapes_need_no_files():
    assert data.dataset_shape("cifar100") == (100, 3, 32)
    assert data.dataset_shape("tiny-imagenet") == (200, 3, 64)
    ds = data.load("digits")  # bundled: the table must agree with the real loader
    assert data.dataset_shape("digits") == (ds.num_classes, ds.in_channels, ds.image_size)


# ----------------------------------------------------------------------------- refused: never executed


def _side_effect(path: str) -> None:
    Path(path).write_text("the pickle ran code")


class Payload:
    """Unpickling this calls _side_effect: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, capsys, digits_net):
    marker = tmp_path / "marker"
    src = tmp_path / "evil.pt"
    torch.save({"state_dict": digits_net.state_dict(), "extra": Payload(marker)}, src)

    line = _one_line_error(*_import(capsys, src, "--arch", "small-cnn", "--dataset", "digits"))
    assert "never unpickles arbitrary objects" in line and "torch.save(model.state_dict()" in line
    assert "_side_effect" in line  # names what the file wanted to call
    assert not marker.exists()
    assert not (tmp_path / "evil.weat.safetensors").exists()

    # The payload is live: an unrestricted load would have run it.
    live = tmp_path / "live-marker"
    torch.save(Payload(live), tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()


def test_whole_model_object_is_refused(tmp_path, capsys, digits_net):
    torch.save(digits_net, tmp_path / "model.pt")  # the module object, not its state dict
    line = _one_line_error(*_import(capsys, tmp_path / "model.pt", "--arch", "small-cnn", "--dataset", "digits"))
    assert "SmallCNN" in line and "state_dict()" in line
    assert not (tmp_path / "model.weat.safetensors").exists()


def test_plain_pickle_and_garbage_are_refused(tmp_path, capsys):
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump({"w": [1, 2]}, f)
    (tmp_path / "g.pt").write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    for name in ("p.pkl", "g.pt", "bad.safetensors", "list.pt", "nope.pt"):
        line = _one_line_error(*_import(capsys, tmp_path / name, "--arch", "small-cnn", "--dataset", "digits"))
        assert name in line


# ----------------------------------------------------------------------------- bad input: exit 2, one line


def _save_variant(tmp_path: Path, net: torch.nn.Module, edit) -> Path:
    sd = dict(net.state_dict())
    edit(sd)
    path = tmp_path / "variant.pt"
    torch.save(sd, path)
    return path


def test_wrong_shape(tmp_path, capsys, digits_net):
    def edit(sd):
        sd["linear.weight"] = torch.zeros(100, 128)
    src = _save_variant(tmp_path, digits_net, edit)
    line = _one_line_error(*_import(capsys, src, "--arch", "small-cnn", "--dataset", "digits"))
    assert "'linear.weight'" in line and "(100, 128)" in line and "(10, 128)" in line
    assert not (tmp_path / "variant.weat.safetensors").exists()


def test_missing_key(tmp_path, capsys, digits_net):
    src = _save_variant(tmp_path, digits_net, lambda sd: sd.pop("linear.bias"))
    line = _one_line_error(*_import(capsys, src, "--arch", "small-cnn", "--dataset", "digits"))
    assert "lacks 1 tensors" in line and "linear.bias" in line


def test_unused_key(tmp_path, capsys, digits_net):
    def edit(sd):
        sd["head2.weight"] = torch.zeros(3)
        sd["head2.bias"] = torch.zeros(3)
    src = _save_variant(tmp_path, digits_net, edit)
    line = _one_line_error(*_import(capsys, src, "--arch", "small-cnn", "--dataset", "digits"))
    assert "2 tensors" in line and "head2.bias, head2.weight" in line


def test_non_finite_weights(tmp_path, capsys, digits_net):
    def edit(sd):
        sd["linear.bias"] = torch.full((10,), float("nan"))
    src = _save_variant(tmp_path, digits_net, edit)
    line = _one_line_error(*_import(capsys, src, "--arch", "small-cnn", "--dataset", "digits"))
    assert "non-finite logits" in line and "linear.bias" in line


@pytest.mark.parametrize("args, needle", [
    (["--arch", "resnet-9000", "--dataset", "digits"], "--arch: unknown 'resnet-9000'"),
    (["--arch", "small-cnn", "--dataset", "mnist"], "--dataset: unknown 'mnist'"),
    (["--arch", "small-cnn", "--dataset", "digits", "--mean", "0.1,x", "--std", "1"], "--mean"),
    (["--arch", "small-cnn", "--dataset", "digits", "--out", "w.pt"], "--out"),
])
def test_bad_options(tmp_path, capsys, digits_net, args, needle):
    torch.save(digits_net.state_dict(), tmp_path / "w.pt")
    line = _one_line_error(*_import(capsys, tmp_path / "w.pt", *args))
    assert needle in line


def test_existing_out_needs_force(tmp_path, capsys, digits_net):
    torch.save(digits_net.state_dict(), tmp_path / "w.pt")
    dst = tmp_path / "taken.safetensors"
    dst.write_bytes(b"precious")
    line = _one_line_error(*_import(capsys, tmp_path / "w.pt", "--arch", "small-cnn", "--dataset", "digits",
                                    "--out", dst))
    assert "--force" in line and str(dst) in line
    assert dst.read_bytes() == b"precious"

    code, out, err = _import(capsys, tmp_path / "w.pt", "--arch", "small-cnn", "--dataset", "digits", "--out", dst,
                             "--force")
    assert code == 0, err
    _assert_same_logits(dst, digits_net)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the atomic write left no temp file
