from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from weatcli import checkpoint as ckpt
from weatcli import fileio
from weatcli.config import resolve
from weatcli.errors import WeatInputError
from weatcli.models import build


def _saved(tmp_path, **sets):
    cfg = resolve(preset="digits-weat", sets=[f"{k}={v}" for k, v in sets.items()])
    torch.manual_seed(0)
    model = build(cfg.model.arch, num_classes=10, in_channels=1, image_size=16, mean=cfg.model.mean, std=cfg.model.std)
    path = tmp_path / "model.safetensors"
    meta = ckpt.model_metadata(cfg, num_classes=10, in_channels=1, image_size=16, epoch=7, metrics={"robust_accuracy": 0.5})
    ckpt.save(path, ckpt.state_dict_of(model), meta)
    return cfg, model, path


def test_round_trip_rebuilds_the_model_from_metadata_alone(tmp_path):
    cfg, model, path = _saved(tmp_path, **{"model.mean": "[0.5]", "model.std": "[0.25]"})
    loaded = ckpt.load(path)
    assert loaded.config == cfg and loaded.epoch == 7 and loaded.metrics == {"robust_accuracy": 0.5}
    assert loaded.metadata["format"] == "weat/1" and loaded.metadata["threat"] == "linf:0.1"
    assert (loaded.num_classes, loaded.in_channels, loaded.image_size) == (10, 1, 16)
    assert json.loads(loaded.metadata["config"])["train"]["method"] == "weat-adv"
    assert not loaded.model.training
    x = torch.rand(4, 1, 16, 16)
    model.eval()
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert "normalize.mean" in ckpt.state_dict_of(loaded.model)


def test_atomic_write_leaves_no_temp_files_and_replaces(tmp_path):
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(target, b"old")
    ckpt.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_truncated_and_random_files_are_clear_errors(tmp_path):
    _, _, path = _saved(tmp_path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 10)
    for bad in (truncated, junk):
        with pytest.raises(WeatInputError, match="not a readable safetensors file") as e:
            ckpt.load(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeatInputError, match="not found"):
        ckpt.load(tmp_path / "missing.safetensors")


def test_foreign_and_mismatched_checkpoints(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(WeatInputError, match="not a weat checkpoint"):
        ckpt.load(foreign)

    cfg, model, path = _saved(tmp_path)
    tensors, meta = ckpt.read(path)
    unknown = dict(meta, config=json.dumps(dict(json.loads(meta["config"]), model={"arch": "vit-h"})))
    save_file(tensors, str(tmp_path / "unknown.safetensors"), metadata=unknown)
    with pytest.raises(WeatInputError, match="vit-h"):
        ckpt.load(tmp_path / "unknown.safetensors")

    wrong = dict(tensors)
    wrong["linear.weight"] = torch.zeros(3, 3)
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata=meta)
    with pytest.raises(WeatInputError, match="linear.weight.*shape"):
        ckpt.load(tmp_path / "wrong.safetensors")

    fewer = {k: v for k, v in tensors.items() if k != "linear.bias"}
    save_file(fewer, str(tmp_path / "fewer.safetensors"), metadata=meta)
    with pytest.raises(WeatInputError, match="missing"):
        ckpt.load(tmp_path / "fewer.safetensors")

    no_config = {k: v for k, v in meta.items() if k != "config"}
    save_file(tensors, str(tmp_path / "noconfig.safetensors"), metadata=no_config)
    with pytest.raises(WeatInputError, match="incomplete weat metadata"):
        ckpt.load(tmp_path / "noconfig.safetensors")
