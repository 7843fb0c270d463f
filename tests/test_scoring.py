"""Scoring: FID / KID through clean-fid's maths, the Inception Score, the image readers, the reference
cache, and the Inception wiring (with a tiny TorchScript stand-in: the real file is never fetched).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import robust_checkpoint
from weatcli import checkpoint as ckpt
from weatcli import config as config_mod
from weatcli import data as data_mod
from weatcli import sampling, scoring
from weatcli.errors import WeatInputError


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Caches under tmp_path; no Inception file anywhere weat looks."""
    monkeypatch.setenv("WEAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WEAT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(scoring, "CLEANFID_DIR", tmp_path / "no-cleanfid")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """clean-fid's KID is many mid-sized matmuls; multithreaded OpenBLAS on a busy 2-core CPU spends
    most of its time spinning, so the tests run its maths single-threaded (same numbers)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return robust_checkpoint(tmp_path_factory)


def gaussian_features(n=3000, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


# ----------------------------------------------------------------------------- metrics


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    f = gaussian_features()
    stats = scoring.gaussian_stats(f)
    assert scoring.fid_from_stats(*stats, *stats) == pytest.approx(0.0, abs=1e-8)
    noise = np.random.default_rng(1).normal(size=f.shape)
    fids = [scoring.fid_from_stats(*scoring.gaussian_stats(f + s * noise), *stats) for s in (0.1, 0.5, 1.0, 2.0)]
    assert fids == sorted(fids) and fids[0] > 0
    # The Frechet distance of N(mu, S) and N(mu, S + s^2 I) for white S: d * (1 + s^2 - 2 sqrt(1 + s^2) + 1) ~ d (sqrt(1+s^2) - 1)^2.
    assert fids[2] == pytest.approx(8 * (np.sqrt(2) - 1) ** 2, rel=0.2)


def test_kid_of_a_set_against_itself_is_about_zero_and_grows_with_noise():
    f = gaussian_features(300)  # KID subsets of 300: clean-fid's kernel maths costs O(m^2) per subset
    noise = np.random.default_rng(1).normal(size=f.shape)
    kids = [scoring.kid(f + s * noise, f) for s in (1.0, 2.0, 3.0)]
    assert abs(scoring.kid(f, f)) < 0.1 < kids[0]  # unbiased estimate: ~0 up to its subset noise
    assert kids == sorted(kids)
    state = np.random.get_state()
    scoring.kid(f, f, seed=3)
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global RNG left as it was
    assert scoring.kid(f + noise, f, seed=5) == scoring.kid(f + noise, f, seed=5)


def test_inception_score_of_uniform_probabilities_is_one():
    mean, std = scoring.inception_score(np.full((500, 10), 0.1))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_k():
    k = 7
    probs = np.eye(k)[np.repeat(np.arange(k), 300)]  # grouped by class, as weat sample writes them
    assert scoring.inception_score(probs, splits=1)[0] == pytest.approx(k)
    mean, _ = scoring.inception_score(probs)  # 10 splits after the fixed shuffle
    assert mean == pytest.approx(k, rel=0.03)
    # Unshuffled, each split would hold one or two classes: the shuffle is what makes the score right.
    assert scoring.inception_score(probs, seed=None)[0] < 2.5


def test_metric_names_are_checked():
    """--metrics is a comma list, read once by ScoreConfig (a list from a preset or --set works too)."""
    assert config_mod.resolve_command(overrides={"score.metrics": "fid, IS,fid"}).score.metrics == ["fid", "is"]
    assert config_mod.resolve_command(sets=['score.metrics=["kid"]']).score.metrics == ["kid"]
    with pytest.raises(WeatInputError, match="score.metrics: unknown metric 'precision'; expected a comma list"):
        config_mod.resolve_command(overrides={"score.metrics": "fid,precision"})
    with pytest.raises(WeatInputError, match="score.metrics: no metric"):
        config_mod.resolve_command(overrides={"score.metrics": " , "})


def score(samples, **settings) -> scoring.ScoreResult:
    """score_samples with the config `weat score` resolves from [score] settings (no checkpoint)."""
    return scoring.score_samples(samples, config_mod.resolve_command(
        overrides={f"score.{k}": v for k, v in settings.items()}))


# ----------------------------------------------------------------------------- image sets


def test_readers_agree_on_samples_npz_and_png_folder(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=x.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "float.npz", x=x.astype(np.float32) / 255)
    from safetensors.torch import save_file

    save_file({"samples": torch.from_numpy(x)}, str(tmp_path / "s.safetensors"), metadata={"dataset": "cifar10"})
    (tmp_path / "png").mkdir()
    for i, im in enumerate(x):
        Image.fromarray(im.transpose(1, 2, 0)).save(tmp_path / "png" / f"{i:03d}.png")
    for source in ("nhwc.npz", "float.npz", "s.safetensors", "png"):
        got = scoring.read_images(tmp_path / source)
        assert torch.equal(got.images, torch.from_numpy(x)), source
    assert scoring.read_images(tmp_path / "s.safetensors").dataset == "cifar10"


@pytest.mark.parametrize("array,match", [
    (np.zeros((4, 5, 8, 8), np.uint8), r"shape \(4, 5, 8, 8\)"),
    (np.zeros((4, 8), np.uint8), r"shape \(4, 8\)"),
    (np.full((2, 1, 4, 4), 2.0, np.float32), r"outside \[0, 1\]"),
])
def test_samples_of_the_wrong_shape_are_bad_input(tmp_path, array, match):
    np.savez(tmp_path / "bad.npz", samples=array)
    with pytest.raises(WeatInputError, match=f"SAMPLES: .*bad.npz array 'samples': .*{match}"):
        scoring.read_images(tmp_path / "bad.npz")


def test_reference_specs(tmp_path):
    ref = scoring.read_reference("digits:test")
    assert ref.images.shape == (360, 1, 16, 16) and ref.description.startswith("digits:test")
    assert scoring.read_reference("digits").images.shape[0] == 1437
    with pytest.raises(WeatInputError, match="--ref: 'nope'"):
        scoring.read_reference("nope")


# ----------------------------------------------------------------------------- --features CKPT


def test_classifier_features_fid_against_itself_is_zero_and_grows_with_noise(model_path, tmp_path):
    x = data_mod.load("digits").test_x  # 360 images, more than the 128 feature dimensions
    np.savez(tmp_path / "test.npz", images=x.numpy())
    g = torch.Generator().manual_seed(0)
    fids = []
    for s in (0.0, 0.1, 0.3):
        noisy = (x.float() + 255 * s * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
        np.savez(tmp_path / f"noisy{s}.npz", images=noisy.numpy())
        r = score(tmp_path / f"noisy{s}.npz", ref=str(tmp_path / "test.npz"), metrics="fid,kid",
                  features=str(model_path), device="cpu")
        fids.append(r.metrics["fid"])
    assert fids[0] == pytest.approx(0.0, abs=1e-6) and fids[0] < fids[1] < fids[2]
    assert r.comparable is False and "not comparable" in r.notes[0]


def test_reference_statistics_are_cached(model_path, tmp_path, monkeypatch):
    cfg = config_mod.resolve_command(stored=ckpt.stored_config(model_path), overrides={
        "sample.steps": 2, "sample.n": 30, "sample.init": "uniform", "sample.device": "cpu"})
    s = sampling.sample_checkpoint(model_path, cfg, out=tmp_path / "s.safetensors")
    calls = []
    real = scoring.extract
    monkeypatch.setattr(scoring, "extract", lambda net, images, **kw: calls.append(len(images)) or real(net, images, **kw))
    first = score(s.files["samples"], features=str(model_path), device="cpu")
    second = score(s.files["samples"], features=str(model_path), device="cpu")
    assert calls == [1437, 30, 30]  # the training split once, the samples each time
    assert (first.reference_cached, second.reference_cached) == (False, True)
    assert first.summary()["fid"] == second.summary()["fid"] and first.reference.startswith("digits:train")
    assert 1.0 <= first.metrics["is_mean"] <= 10.0


def test_features_checkpoint_must_fit_the_images(model_path, tmp_path):
    np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(WeatInputError, match="--features: .* takes 1x16x16 images; got 3x32x32"):
        score(tmp_path / "rgb.npz", ref=str(tmp_path / "rgb.npz"), features=str(model_path), device="cpu")


# ----------------------------------------------------------------------------- Inception wiring


class _FakeLayers(nn.Module):
    """Stands in for the Inception trunk: 12 pooled values plus the min and max of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(1)
        extremes = torch.stack([x.amin((1, 2, 3)), x.amax((1, 2, 3))], 1)
        return torch.cat([pooled, extremes], 1).view(-1, 14, 1, 1)


class _FakeInception(nn.Module):
    """The call convention of clean-fid's inception-2015-12-05.pt: .layers (features), .output (logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeLayers()
        self.output = nn.Linear(14, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = self.layers((img - 128.0) / 128.0).flatten(1)
        return feats if return_features else torch.softmax(self.output(feats), 1)


@pytest.fixture
def fake_inception(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "fake-inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; clean-fid's weights are TorchScript
        torch.jit.script(_FakeInception()).save(str(path))
    return path


def test_inception_weights_missing_offline_names_the_file_and_its_url():
    with pytest.raises(WeatInputError) as e:
        scoring.find_inception_weights()
    assert scoring.INCEPTION_FILE in str(e.value) and scoring.INCEPTION_URL in str(e.value)
    from cleanfid.downloads_helper import inception_url

    assert scoring.INCEPTION_URL == inception_url


def test_inception_weights_from_the_environment(fake_inception, monkeypatch, tmp_path):
    monkeypatch.setenv("WEAT_INCEPTION_WEIGHTS", str(fake_inception))
    assert scoring.find_inception_weights() == fake_inception
    monkeypatch.setenv("WEAT_INCEPTION_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(WeatInputError, match=r"\$WEAT_INCEPTION_WEIGHTS: .*missing.pt not found"):
        scoring.find_inception_weights()


def test_inception_path_is_clean_fid_clean_mode(fake_inception):
    """Grey uint8 images -> RGB -> clean-fid's PIL bicubic 299x299 -> (x - 128) / 128 -> .layers."""
    from cleanfid.resize import build_resizer

    net = scoring.inception_net(fake_inception, torch.device("cpu"))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8))
    x[0] = 255
    feats, probs = net.forward(x, True)
    assert feats[0, 12:].tolist() == [127 / 128, 127 / 128]  # a white image, normalised as clean-fid does
    resize = build_resizer("clean")
    big = resize(np.repeat(x[1].permute(1, 2, 0).numpy(), 3, axis=2))
    expected = F.adaptive_avg_pool2d((torch.from_numpy(big).permute(2, 0, 1)[None] - 128) / 128, 2).flatten()
    torch.testing.assert_close(feats[1, :12], expected.double(), rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = torch.jit.load(str(fake_inception))
    torch.testing.assert_close(probs, torch.softmax(feats @ base.output.weight.double().t(), 1))  # no output bias
    assert net.comparable


def test_score_with_an_inception_file(fake_inception, tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=x)
    r = score(tmp_path / "a.npz", ref=str(tmp_path / "a.npz"), inception_weights=str(fake_inception), device="cpu",
              batch_size=16)
    s = r.summary()
    assert s["fid"] == pytest.approx(0.0, abs=1e-6) and abs(s["kid"]) < 1e-3 and 1.0 <= s["is_mean"] <= 5.0
    assert s["features"] == "inception" and s["comparable_with_inception"] is True and s["n"] == 40


def test_inception_file_in_the_shared_folder_is_used_only_when_private(monkeypatch, tmp_path):
    """clean-fid's download folder is /tmp, where anyone can drop a file, and the weights are a
    TorchScript program: a copy there counts only if it is ours and nobody else may write it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(scoring, "CLEANFID_DIR", shared)
    planted = shared / scoring.INCEPTION_FILE
    planted.write_bytes(b"not a real network")
    planted.chmod(0o666)  # world-writable: not trusted
    with pytest.raises(WeatInputError, match="not found"):
        scoring.find_inception_weights()
    planted.chmod(0o600)
    assert scoring.find_inception_weights() == planted
