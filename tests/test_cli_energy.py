"""`weat energy`: stats / plot / compare / trades end to end on a tiny trained model and run."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, trained_run




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory, "trades"), trained_run(tmp_path_factory, "standard", epochs=2)


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_stats_json(trained, capsys):
    code, out, err = run_cli(["energy", "stats", str(trained[0].checkpoint), "--n", "40", "--steps", "3", "--json", "--per-class"], capsys)
    assert code == 0, err
    stats = json.loads(out)
    assert set(stats["energies"]) == {"clean", "pgd", "pgd-targeted"}
    assert set(stats["energies"]["pgd"]) == {"energy", "joint", "delta_energy", "delta_joint"}
    assert stats["n"] == 40 and sum(c["clean"]["energy"]["n"] for c in stats["per_class"].values()) == 40


def test_default_n_is_capped_by_the_split(trained, capsys):
    """The digits test split has 360 images, fewer than the default 1000: all of them are used."""
    code, out, err = run_cli(["energy", "stats", str(trained[0].checkpoint), "-a", "pgd", "--steps", "1", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 360


def test_plot_checkpoint_and_run_dirs(trained, tmp_path, capsys):
    fig = tmp_path / "figs" / "hist.png"
    code, out, err = run_cli(["energy", "plot", str(trained[0].checkpoint), "--out", str(fig), "--n", "40", "--steps", "3",
                          "-a", "pgd", "-a", "cw-targeted"], capsys)
    assert code == 0, err
    assert out.strip() == str(fig)
    _png_ok(fig)
    numbers = json.loads(fig.with_suffix(".json").read_text())
    assert all(sum(c["energy"]) == 40 for c in numbers["counts"].values())

    dyn = tmp_path / "dyn.png"
    code, out, err = run_cli(["energy", "plot", str(trained[0].run_dir), str(trained[1].run_dir), "--out", str(dyn), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary["phases"]) == {"trades", "standard"}
    _png_ok(dyn)
    plotted = json.loads(dyn.with_suffix(".json").read_text())
    assert plotted["trades"]["epoch"] == [1, 2, 3]


def test_compare_orders_by_robust_accuracy(trained, tmp_path, capsys):
    fig = tmp_path / "cmp.png"
    code, out, err = run_cli(["energy", "compare", str(trained[1].checkpoint), str(trained[0].checkpoint), "--out", str(fig),
                          "--n", "40", "--steps", "3", "--json"], capsys)
    assert code == 0, err
    _png_ok(fig)
    assert fig.with_suffix(".json").is_file()


def test_trades_identity_from_the_cli(trained, capsys):
    code, out, err = run_cli(["energy", "trades", str(trained[0].checkpoint), "--n", "32", "--steps", "3", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["max_abs_gap"] < 1e-9 and r["kl_mean"] == pytest.approx(r["joint_term_mean"] + r["marginal_term_mean"], abs=1e-9)


@pytest.mark.parametrize("argv,needle", [
    (["energy", "stats", "missing.safetensors"], "not found"),
    (["energy", "stats", "CKPT", "--attack", "fgsm"], "fgsm"),
    (["energy", "plot", "missing-dir", "--out", "x.png"], "not found"),
    (["energy", "trades", "CKPT", "--n", "0"], "--n"),
])
def test_bad_input(argv, needle, trained, capsys):
    argv = [str(trained[0].checkpoint) if a == "CKPT" else a for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == "" and needle in err and len(err.strip().splitlines()) == 1
