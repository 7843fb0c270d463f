"""`weat energy`: stats / plot / compare / trades end to end on a tiny trained model and run."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, trained_run
from weatcli.energy import ENERGY_QUANTITIES, NATURAL_QUANTITIES




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
    assert tuple(stats["energies"]["pgd"]) == ENERGY_QUANTITIES
    assert tuple(stats["energies"]["clean"]) == NATURAL_QUANTITIES
    assert stats["n"] == 40 and sum(c["clean"]["energy_natural"]["n"] for c in stats["per_class"].values()) == 40
    assert set(stats["config"]) == {"data", "attack", "lens"}
    assert stats["config"]["lens"]["n"] == 40 and stats["config"]["lens"]["steps"] == 3
    assert stats["config"]["lens"]["per_class"] is True and stats["config"]["data"]["dataset"] == "digits"


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
    assert set(numbers["counts"]) == {"clean", "pgd", "cw-targeted"}
    assert all(sum(c["energy_natural" if name == "clean" else "energy_adversarial"]) == 40
               for name, c in numbers["counts"].items())

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
    summary = json.loads(out)
    assert set(summary["models"]) == set(summary["config"]) and len(summary["config"]) == 2
    assert all(c["lens"]["attacks"] == ["pgd"] and c["lens"]["n"] == 40 for c in summary["config"].values())
    stats = summary["models"][summary["order"][0]]["delta_energy"]
    assert set(stats) == {"mean", "std", "q05", "q25", "q50", "q75", "q95", "n"} and stats["n"] == 40


def test_trades_identity_from_the_cli(trained, capsys):
    code, out, err = run_cli(["energy", "trades", str(trained[0].checkpoint), "--n", "32", "--steps", "3", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["max_abs_gap"] < 1e-9 and r["kl_mean"] == pytest.approx(r["joint_term_mean"] + r["marginal_term_mean"], abs=1e-9)
    assert r["steps"] == 3 and r["config"]["lens"]["trades_steps"] == 3 and r["config"]["lens"]["n"] == 32


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


# ----------------------------------------------------------------------------- config per command


@pytest.mark.parametrize("command,needles", [
    ("stats", ["--steps", "[default: 20]", "[default: pgd,pgd-targeted]", "[default: 500]", "[default: the checkpoint's]"]),
    ("trades", ["--steps", "[default: 10]", "--preset", "--set"]),
    ("compare", ["[default: pgd, the first of lens.attacks]", "--preset", "--set"]),
    ("plot", ["[default: 20]", "--preset", "--set"]),
])
def test_help_shows_the_config_defaults(command, needles, capsys):
    code, out, err = run_cli(["energy", command, "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0 and all(needle in text for needle in needles), text


def test_set_changes_what_runs(trained, capsys):
    code, out, err = run_cli(["energy", "stats", str(trained[0].checkpoint), "--set", "lens.n=24", "--set",
                              'lens.attacks=["pgd"]', "--set", "lens.steps=1", "--eps", "0.05", "--json"], capsys)
    assert code == 0, err
    stats = json.loads(out)
    assert stats["config"]["lens"]["n"] == 24 and stats["config"]["lens"]["attacks"] == ["pgd"]
    assert stats["n"] == 24 and set(stats["energies"]) == {"clean", "pgd"}
    # --eps overrides the checkpoint's threat; the step size keeps the checkpoint's ratio to eps.
    assert stats["eps"] == stats["config"]["attack"]["eps"] == 0.05
    assert stats["config"]["attack"]["step_size"] == pytest.approx(0.05 * 0.025 / 0.1)


def test_trades_set_steps(trained, capsys):
    code, out, err = run_cli(["energy", "trades", str(trained[0].checkpoint), "--n", "16", "--set", "lens.trades_steps=2",
                              "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["steps"] == 2 and r["config"]["lens"]["trades_steps"] == 2 and r["n"] == 16


def test_preset_section_applies(trained, tmp_path, capsys):
    preset = tmp_path / "lens.toml"
    preset.write_text('[lens]\nn = 16\nattacks = ["pgd"]\nsteps = 1\n\n[attack]\neps = 0.05\n')
    code, out, err = run_cli(["energy", "stats", str(trained[0].checkpoint), "--preset", str(preset), "--json"], capsys)
    assert code == 0, err
    stats = json.loads(out)
    assert stats["n"] == 16 and set(stats["energies"]) == {"clean", "pgd"} and stats["eps"] == 0.05
    assert stats["config"]["lens"]["steps"] == 1
    # A flag beats the preset.
    code, out, err = run_cli(["energy", "stats", str(trained[0].checkpoint), "--preset", str(preset), "--n", "8",
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["n"] == 8


def test_plot_json_echoes_the_config(trained, tmp_path, capsys):
    fig = tmp_path / "h.png"
    code, out, err = run_cli(["energy", "plot", str(trained[0].checkpoint), "--out", str(fig), "--n", "12", "--steps", "1",
                              "-a", "pgd", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["config"]["lens"]["attacks"] == ["pgd"] and summary["n"] == 12
    assert set(summary["means"]["clean"]) == set(NATURAL_QUANTITIES)
    assert set(summary["means"]["pgd"]) == {"energy_adversarial", "joint_adversarial"}


@pytest.mark.parametrize("argv,needles", [
    (["energy", "stats", "CKPT", "--set", "lens.steps=-1"], ["lens.steps", "-1"]),
    (["energy", "stats", "CKPT", "--set", 'lens.attacks=["fgsm"]'], ["lens.attacks", "fgsm"]),
    (["energy", "stats", "CKPT", "--set", 'lens.attacks=["square-targeted"]'], ["lens.attacks", "square-targeted"]),
    (["energy", "trades", "CKPT", "--steps", "-2"], ["--steps (lens.trades_steps)", "-2"]),
    (["energy", "trades", "CKPT", "--set", "lens.nope=1"], ["lens.nope", "unknown key"]),
    (["energy", "compare", "CKPT", "--out", "OUT", "--set", "lens.batch_size=0"], ["lens.batch_size", "0"]),
    (["energy", "plot", "RUN", "--out", "OUT", "--set", "lens.n=0"], ["lens.n", "0"]),
])
def test_bad_config_is_bad_input(argv, needles, trained, tmp_path, capsys):
    subs = {"CKPT": str(trained[0].checkpoint), "RUN": str(trained[0].run_dir), "OUT": str(tmp_path / "f.png")}
    code, out, err = run_cli([subs.get(a, a) for a in argv], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert all(needle in err for needle in needles), err
    assert list(tmp_path.iterdir()) == []


def test_run_label_comes_from_the_checkpoint(tmp_path):
    """A run directory's label is the method its checkpoint names (e.g. "imported"), not its config's."""
    import torch

    from weatcli import checkpoint as ckpt
    from weatcli.cli import _run_label

    run = tmp_path / "some-run"
    run.mkdir()
    (run / "config.toml").write_text('[train]\nmethod = "trades"\n')
    assert _run_label(run, set()) == "trades"
    ckpt.save(run / "model.safetensors", {"w": torch.zeros(1)}, {"format": ckpt.FORMAT, "method": "imported"})
    assert _run_label(run, set()) == "imported"
    assert _run_label(run, {"imported"}) == "imported (some-run)"
    (run / "config.toml").write_text('[train]\nmethod = "fgsm-rs"\nder_weight = 1.0\n')
    (run / "model.safetensors").unlink()
    assert _run_label(run, set()) == "fgsm-rs + DER"  # a DER run is told apart from its method's plain run
    (run / "config.toml").write_text('[train]\nmethod = "fgsm-rs"\nder_weight = 1.0\nder_grad = "adversarial"\n')
    assert _run_label(run, set()) == "fgsm-rs + DER (x* only)"  # ... and from the other DER variant
    (run / "config.toml").write_text('[train]\nmethod = "fgsm-rs"\nder_weight = 1.0\nder_grad = "adversarial"\n'
                                     'der_anchor = 0.001\n')
    assert _run_label(run, set()) == "fgsm-rs + DER (x* only) + anchor"
    (run / "config.toml").write_text('[train]\nmethod = "fgsm-rs"\nder_anchor = 0.001\n')
    assert _run_label(run, set()) == "fgsm-rs + anchor"


def test_plot_run_dir_names_catastrophic_overfitting(tmp_path, capsys):
    """`energy plot RUN_DIR`: the per-run line and the JSON name the CO epoch; the figure marks it."""
    run = tmp_path / "co-run"
    run.mkdir()
    (run / "config.toml").write_text('[train]\nmethod = "fgsm-rs"\n')
    rows = [{"epoch": e, "robust_accuracy": 0.4 if e < 13 else 0.0, "energy_natural": -4.0,
             "delta_energy": -0.1 * min(e, 8) if e < 13 else 2.0 + 0.01 * (e % 3)} for e in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = tmp_path / "co.png"
    code, out, err = run_cli(["energy", "plot", str(run), "-o", str(fig), "--json"], capsys)
    assert code == 0, err
    assert "fgsm-rs: no phase 3 detected; catastrophic overfitting at epoch 13; best robust epoch 1" in err
    assert json.loads(out)["phases"]["fgsm-rs"]["catastrophic_overfitting_epoch"] == 13
    assert json.loads(fig.with_suffix(".json").read_text())["fgsm-rs"]["phases"]["catastrophic_overfitting_epoch"] == 13
    _png_ok(fig)
    # With dE(x,y) back below its pre-break level from epoch 15: recovered by epoch 19.
    for r in rows:
        r["delta_joint"] = -1.0 if r["epoch"] < 13 else 0.5 if r["epoch"] < 15 else -2.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(["energy", "plot", str(run), "-o", str(fig), "--json"], capsys)
    assert code == 0, err
    assert "catastrophic overfitting at epoch 13, recovered by epoch 19; best robust epoch 1" in err
    assert json.loads(out)["phases"]["fgsm-rs"]["co_recovery_epoch"] == 19
    _png_ok(fig)
