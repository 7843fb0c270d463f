"""The evaluation engine: robust accuracy and energies under PGD, CW and AutoAttack.

One small digits model is adversarially trained per session (a few seconds) and attacked on CPU.
Full-strength AutoAttack parts are slow on a CPU, so tests that only check the adapter's contract
(eps ball, resume) shrink the package's iteration counts through `cheap_autoattack`; the test that
compares AutoAttack with PGD runs the real settings on a few images.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import trained_checkpoint, write_cifar10
from weatcli import attacks, evaluate
from weatcli import checkpoint as ckpt
from weatcli import data as data_mod
from weatcli.attack_checkpoint import evaluate_checkpoint, resolve_config
from weatcli.energy import ENERGY_QUANTITIES, energy, joint_energy
from weatcli.errors import WeatInputError
from weatcli.sanity import sanity_checks


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def digits():
    ds = data_mod.load("digits")
    return ds.test_x, ds.test_y


@pytest.fixture
def model(model_path):
    return ckpt.load(model_path).model


@pytest.fixture
def cheap_autoattack(monkeypatch):
    """The official package with its iteration and query counts cut down (the contract is the same)."""
    import pyautoattack

    real = pyautoattack.AutoAttack

    class Cheap(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.apgd.n_iter = self.apgd_targeted.n_iter = self.fab.n_iter = 4
            self.apgd_targeted.n_target_classes = self.fab.n_target_classes = 2
            self.square.n_queries = 30

    monkeypatch.setattr(pyautoattack, "AutoAttack", Cheap)


def _run(model, x, y, **kwargs):
    kwargs.setdefault("eps", 0.1)
    return evaluate.evaluate_model(model=model, x=x, y=y, **kwargs)


def _size(x_adv, x, norm):
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def test_trained_model_is_a_reasonable_robust_classifier(model, digits):
    x, y = digits
    r = _run(model, x, y, attacks=["pgd"])
    assert r.n == len(y) == 360
    assert r.clean_accuracy > 0.8  # the tiny model has learnt the digits...
    assert 0.05 < r.attacks["pgd"].robust_accuracy < r.clean_accuracy - 0.1  # ...and PGD lowers its accuracy
    assert r.warnings == []  # logits, deterministic, eval mode, non-zero gradients


@pytest.mark.parametrize("name,norm,eps", [("pgd", "linf", 0.1), ("pgd", "l2", 1.0), ("cw", "linf", 0.1),
                                           ("pgd", "linf", 0.5)])
def test_adversarial_points_respect_the_ball_and_pixel_range(model, digits, name, norm, eps):
    x, y = digits[0][:64], digits[1][:64]
    r = _run(model, x, y, attacks=[name], norm=norm, eps=eps, steps=5, restarts=2, keep_adversarial=True)
    x_adv = r.attacks[name].x_adv
    assert x_adv.dtype == torch.float32 and x_adv.shape == (64, 1, 16, 16)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    size = _size(x_adv, r.x, norm)
    assert (size <= eps + 1e-6).all() and (size > 0).any()


def test_autoattack_parts_respect_the_ball_and_pixel_range(model, digits, cheap_autoattack):
    x, y = digits[0][:48], digits[1][:48]
    names = ["apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square", "autoattack"]
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):
        r = _run(model, x, y, attacks=names, norm=norm, eps=eps, keep_adversarial=True)
        for name in names:
            a = r.attacks[name]
            assert a.x_adv.min() >= 0 and a.x_adv.max() <= 1
            assert (_size(a.x_adv, r.x, norm) <= eps + 1e-5).all(), (name, norm)
            # The package's convention: x* moves only where it fools the model.
            moved = (a.x_adv != r.x).flatten(1).any(1)
            assert not (moved & a.robust).any()
        assert r.attacks["autoattack"].stages.keys() == {"apgd-ce", "apgd-t", "fab-t", "square"}


def test_eps_zero_is_clean_accuracy(model, digits):
    x, y = digits[0][:128], digits[1][:128]
    r = _run(model, x, y, attacks=["pgd", "cw"], eps=0.0, steps=3, keep_adversarial=True)
    for a in r.attacks.values():
        assert a.robust_accuracy == r.clean_accuracy
        assert torch.equal(a.x_adv, r.x)
        torch.testing.assert_close(a.energy_adversarial, r.energy_natural)
        assert a.energy["delta_energy"]["mean"] == 0.0 and a.energy["delta_joint"]["mean"] == 0.0
    assert r.worst_case_accuracy == r.clean_accuracy


@pytest.mark.parametrize("target", ["random", "least-likely", 3])
def test_targeted_pgd_moves_predictions_to_the_target(model, digits, target):
    x, y = digits[0][:64], digits[1][:64]
    r = _run(model, x, y, attacks=["pgd"], eps=0.5, steps=20, step_size=0.05, targeted=True, target_class=target,
             keep_adversarial=True)
    a = r.attacks["pgd"]
    assert a.target_success_rate > 0.9
    with torch.no_grad():
        pred = model(a.x_adv).argmax(1)
    aimed = a.targets != y
    assert (pred[aimed] == a.targets[aimed]).float().mean() == pytest.approx(a.target_success_rate)
    if target == "random":
        assert aimed.all() and len(a.targets.unique()) > 3
    elif target == 3:
        assert (a.targets == 3).all()


def test_choose_targets():
    logits = torch.tensor([[0.0, 1.0, -2.0], [3.0, -1.0, 0.0]])
    y = torch.tensor([1, 0])
    assert attacks.choose_targets(y, logits, "least-likely").tolist() == [2, 1]
    assert attacks.choose_targets(y, logits, 2).tolist() == [2, 2]
    many = attacks.choose_targets(torch.zeros(1000, dtype=torch.long), torch.zeros(1000, 10), "random",
                                  generator=torch.Generator().manual_seed(0))
    assert (many != 0).all() and set(many.tolist()) == set(range(1, 10))
    with pytest.raises(ValueError):
        attacks.choose_targets(y, logits, 7)


def test_autoattack_is_never_weaker_than_pgd(model, digits):
    # Real AutoAttack settings (APGD-CE 100 iterations, APGD-T 9 targets) on a handful of images.
    x, y = digits[0][:48], digits[1][:48]
    r = _run(model, x, y, attacks=["pgd", "apgd-ce", "apgd-t"])
    pgd_robust = r.attacks["pgd"].robust
    aa_robust = r.attacks["apgd-ce"].robust & r.attacks["apgd-t"].robust
    assert aa_robust.sum() <= pgd_robust.sum()
    assert r.attacks["apgd-ce"].robust_accuracy <= r.attacks["pgd"].robust_accuracy + 1 / 48


def test_worst_case_is_robust_under_every_attack(model, digits):
    x, y = digits[0][:96], digits[1][:96]
    r = _run(model, x, y, attacks=["pgd", "cw"], steps=5, targeted=False)
    both = r.correct & r.attacks["pgd"].robust & r.attacks["cw"].robust
    assert r.worst_case_accuracy == both.sum().item() / len(y)
    assert r.worst_case_accuracy <= min(a.robust_accuracy for a in r.attacks.values())


def test_energies_are_those_of_the_returned_points(model, digits):
    x, y = digits[0][:80], digits[1][:80]
    r = _run(model, x, y, attacks=["pgd"], steps=5, batch_size=32, keep_adversarial=True)
    a = r.attacks["pgd"]
    with torch.no_grad():
        nat, adv = model(r.x), model(a.x_adv)
    torch.testing.assert_close(r.energy_natural, -torch.logsumexp(nat, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(a.energy_adversarial, -torch.logsumexp(adv, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(a.joint_adversarial, -adv.gather(1, y[:, None]).squeeze(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(r.joint_natural, joint_energy(nat, y), atol=1e-4, rtol=0)
    # The robust flags (and so the accuracy) are reproduced by the returned points.
    robust = (nat.argmax(1) == y) & (adv.argmax(1) == y)
    assert torch.equal(a.robust, robust) and a.robust_accuracy == robust.sum().item() / len(y)
    e = {k: v["mean"] for k, v in a.energy.items()}  # the energy.summarize schema
    assert list(a.energy) == list(ENERGY_QUANTITIES) and all(v["n"] == len(y) for v in a.energy.values())
    assert e["energy_adversarial"] == pytest.approx(energy(adv).mean().item(), abs=1e-4)
    assert e["delta_energy"] == pytest.approx(e["energy_natural"] - e["energy_adversarial"], abs=1e-6)
    assert e["delta_joint"] == pytest.approx(e["joint_natural"] - e["joint_adversarial"], abs=1e-6)
    assert a.energy["energy_natural"]["std"] == pytest.approx(energy(nat).std(correction=0).item(), abs=1e-4)


def test_same_seed_same_result_and_state_resumes_exactly(model, digits, tmp_path, cheap_autoattack):
    x, y = digits[0][:96], digits[1][:96]
    kwargs = dict(attacks=["pgd", "autoattack"], steps=3, batch_size=32, seed=3, keep_adversarial=True)
    full = _run(model, x, y, **kwargs)
    again = _run(model, x, y, **kwargs)
    for name in full.attacks:
        assert torch.equal(full.attacks[name].x_adv, again.attacks[name].x_adv)

    state = tmp_path / "state.safetensors"
    for stop_after in (("pgd", 1), ("autoattack", 2)):  # inside an engine attack, then inside AutoAttack
        calls = []

        def interrupt(kind, p, stop_after=stop_after, calls=calls):
            if kind == "progress" and p["attack"] == stop_after[0]:
                calls.append(p)
                if len(calls) == stop_after[1]:
                    raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            _run(model, x, y, state_path=state, on_event=interrupt, **kwargs)
        assert state.is_file()
    events = []
    resumed = _run(model, x, y, state_path=state, on_event=lambda kind, p: events.append(kind), **kwargs)
    assert "resume" in events
    for name, a in full.attacks.items():
        b = resumed.attacks[name]
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.robust, b.robust)
        assert torch.equal(a.energy_adversarial, b.energy_adversarial)
        assert a.stages == b.stages
    assert resumed.worst_case_accuracy == full.worst_case_accuracy
    # A finished state answers at once; a state of another evaluation is refused.
    assert _run(model, x, y, state_path=state, **kwargs).attacks["pgd"].robust_accuracy == full.attacks["pgd"].robust_accuracy
    with pytest.raises(WeatInputError, match="eps"):
        _run(model, x, y, state_path=state, **{**kwargs, "eps": 0.2})


class _Softmax(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class _Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + torch.randn(x.shape[0], 10)


class _Quantised(nn.Module):  # rounding the input: zero gradient almost everywhere
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


@pytest.mark.parametrize("wrap,needle", [(_Softmax, "probabilities"), (_Noisy, "differ"), (_Quantised, "zero")])
def test_sanity_checks_warn_but_do_not_fail(model, digits, wrap, needle):
    x, y = digits[0][:32], digits[1][:32]
    seen = []
    r = _run(wrap(model), x, y, attacks=["pgd"], steps=1, on_event=lambda kind, p: seen.append((kind, p)))
    warnings = [p["message"] for kind, p in seen if kind == "warning"]
    assert any(needle in w for w in warnings) and r.warnings == warnings
    assert all(w.endswith("(see docs/science.md#evaluation-protocol)") for w in warnings)  # where to read more
    assert 0 <= r.attacks["pgd"].robust_accuracy <= 1


def test_log_softmax_outputs_are_flagged():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.LogSoftmax(1))
    assert any("log-probabilities" in w for w in sanity_checks(model.eval(), torch.rand(8, 1, 2, 2),
                                                               torch.zeros(8, dtype=torch.long)))


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"attacks": ["fgsm"]}, "--attack: unknown 'fgsm'; expected one of pgd, cw, autoattack, apgd-ce"),
        ({"attacks": []}, "--attack: no attack given"),
        ({"eps": -0.1}, "--eps"),
        ({"eps": 1.5}, "--eps"),
        ({"steps": -1}, "--steps"),
        ({"restarts": 0}, "--restarts"),
        ({"batch_size": 0}, "--batch-size"),
        ({"step_size": 0.0}, "--step-size"),
        ({"norm": "l1"}, "--norm"),
        ({"targeted": True, "target_class": 10}, "--target-class"),
        ({"targeted": True, "target_class": "most-likely"}, "--target-class"),
        ({"targeted": True, "attacks": ["apgd-ce"]}, "--targeted"),
    ],
)
def test_bad_settings_are_input_errors(model, digits, kwargs, needle):
    x, y = digits[0][:8], digits[1][:8]
    with pytest.raises(WeatInputError, match=needle):
        _run(model, x, y, **kwargs)


def _evaluate_checkpoint(path, **overrides):
    """evaluate_checkpoint on the config weat attack resolves for flags {"section.key": value}."""
    cfg = resolve_config(stored=ckpt.stored_config(path), overrides=overrides)
    return evaluate_checkpoint(path, cfg)


def test_checkpoint_defaults_and_mismatched_data(model_path, tmp_path):
    r = _evaluate_checkpoint(model_path, **{"evaluate.n": 40, "evaluate.steps": 2})
    assert (r.eps, r.norm, r.n) == (0.1, "linf", 40)  # the checkpoint's threat
    assert r.attacks["pgd"].settings["step_size"] == pytest.approx(0.025)  # its step ratio: eps / 4
    assert _evaluate_checkpoint(model_path, **{"evaluate.n": 8, "evaluate.steps": 1, "attack.eps": 0.2}).attacks[
        "pgd"].settings["step_size"] == pytest.approx(0.05)
    with pytest.raises(WeatInputError, match="--n: 361"):
        _evaluate_checkpoint(model_path, **{"evaluate.n": 361})
    with pytest.raises(WeatInputError, match="--eps: required"):
        _evaluate_checkpoint(model_path, **{"attack.norm": "l2"})
    root = write_cifar10(tmp_path / "data")
    with pytest.raises(WeatInputError, match="channels 3.*expects 1"):
        _evaluate_checkpoint(model_path, **{"data.dataset": "cifar10", "data.data_dir": str(root)})


def test_autoattack_batch_that_does_not_fit_is_run_in_halves(monkeypatch):
    from weatcli import attacks as attacks_mod
    from weatcli.evaluate import _autoattack_fitting

    sizes = []

    def fake(model, x, y, *, on_warning, **kwargs):
        sizes.append(len(x))
        if len(x) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return x + y.view(-1, 1, 1, 1).float()  # per-example, so order is checkable

    monkeypatch.setattr(attacks_mod, "autoattack", fake)
    x, y = torch.zeros(20, 1, 2, 2), torch.arange(20)
    warnings: list[str] = []
    out = _autoattack_fitting(None, x, y, on_warning=warnings.append, eps=0.1)
    assert torch.equal(out[:, 0, 0, 0], y.float())  # every image once, in order
    assert sizes == [20, 10, 5, 5, 10, 5, 5]
    assert len(set(warnings)) == 2 and all("did not fit" in w for w in warnings)


# ----------------------------------------------------------------------------- names, rules, streams


def test_attack_names_and_rules_are_the_configs():
    from weatcli import config

    assert tuple(evaluate.ATTACKS) == config.EVAL_ATTACKS  # one list of names, one map to stages
    assert evaluate.TARGETED_ATTACKS == config.EVAL_TARGETED_ATTACKS
    for name, stages in evaluate.ATTACKS.items():
        engine = name in evaluate.TARGETED_ATTACKS  # our PGD (ce / cw objective): one stage of that name
        assert stages == (name,) if engine else stages and set(stages) <= set(attacks.AUTOATTACK_PARTS), name
    for mode in attacks.TARGET_MODES:  # every mode the attacks know is a valid target_class
        assert config.EvaluateConfig(target_class=mode).target == mode


def test_evaluate_config_reads_names_and_targets():
    from pydantic import ValidationError

    from weatcli.config import EvaluateConfig

    assert EvaluateConfig(attacks=["PGD", " cw", "pgd", "AutoAttack"]).attacks == ["pgd", "cw", "autoattack"]
    assert EvaluateConfig(target_class=3).target == 3 and EvaluateConfig(target_class=" Least_Likely").target == "least-likely"
    assert EvaluateConfig(targeted=True, attacks=["apgd-ce", "cw"]).targeted
    for bad, needle in [({"attacks": ["deepfool"]}, "expected one of pgd, cw, autoattack, apgd-ce, apgd-dlr, apgd-t, fab, "
                         "fab-t, square"), ({"target_class": "most-likely"}, "'random' or 'least-likely'"),
                        ({"target_class": -1}, "a class index"), ({"targeted": True, "attacks": ["square"]}, "pgd and cw")]:
        with pytest.raises(ValidationError, match=needle):
            EvaluateConfig(**bad)


@pytest.mark.parametrize("targeted", [False, True])
def test_changing_the_set_of_attacks_leaves_each_attacks_seeded_results_unchanged(model, digits, targeted):
    # PGD starts come from (seed, ATTACK, the attack's name, batch), targets from (seed, ATTACK_TARGETS):
    # never from the attack's position in the list or in ATTACKS.
    x, y = digits[0][:48], digits[1][:48]
    kwargs = dict(steps=3, batch_size=32, seed=5, targeted=targeted, keep_adversarial=True)
    together = _run(model, x, y, attacks=["cw", "pgd"], **kwargs)
    for name in ("pgd", "cw"):
        alone = _run(model, x, y, attacks=[name], **kwargs).attacks[name]
        both = together.attacks[name]
        assert torch.equal(alone.robust, both.robust) and torch.equal(alone.x_adv, both.x_adv)
        assert torch.equal(alone.energy_adversarial, both.energy_adversarial)
        assert torch.equal(alone.joint_adversarial, both.joint_adversarial)
        assert alone.energy == both.energy and alone.robust_accuracy == both.robust_accuracy
        if targeted:
            assert torch.equal(alone.targets, both.targets)
    assert not torch.equal(together.attacks["pgd"].x_adv, together.attacks["cw"].x_adv)  # two streams, two attacks


def test_eps_zero_is_allowed_for_attack_only(model_path):
    from weatcli.config import AttackConfig

    with pytest.raises(ValueError, match="eps must be > 0"):  # training needs a ball
        AttackConfig(eps=0)
    cfg = resolve_config(stored=ckpt.stored_config(model_path), overrides={"attack.eps": "0/255"})
    assert cfg.attack.eps == 0.0 and cfg.attack.steps == ckpt.stored_config(model_path).attack.steps
    assert evaluate.attack_threat(eps=0, norm="l2", step_size=0.1).eps == 0.0
    with pytest.raises(WeatInputError, match="--eps"):
        evaluate.attack_threat(eps=-0.1, norm="linf", step_size=0.1)
