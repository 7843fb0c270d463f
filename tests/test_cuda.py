"""The CUDA tier (`pytest -m cuda`): on a GPU every speed path computes what the eager path
computes, and train / attack / sample run end to end.

Every test here is marked `cuda` and skips without a CUDA device, so a CPU-only CI stays green.
`WEAT_TEST_DEVICE=cpu` runs the same tests on the CPU (NCCL and two-GPU tests skip there; the graph
tests then run the same static-buffer step eagerly, and capture is checked on CUDA only): that is
how the tier is kept working between the rare GPU sessions. `WEAT_TEST_DEVICE=cuda:N` picks a GPU.
Everything is small, for a tier meant to take under 2 minutes on an H100: small-cnn on a tiny npz
dataset (4 classes of 8x8 images) or on random batches.

Tolerances. A CUDA graph, a compiled model and the eager loop differ at most in float rounding,
but PGD's sign step turns a rounding-size difference in a gradient entry near 0 into a full step
in that pixel; attacks are therefore compared by the share of pixels that differ and by the
objective they reach, not elementwise. CUDA and CPU generators draw different numbers from the same
seed, so seeded commands on the device and on the CPU (attack, sample) are compared by accuracies
and energies within margins a few times their spread over seeds on the CPU. Training is chaotic
at this scale (a 1e-6 relative nudge of the initial weights moves the weights after 24 steps by
19%), so a resumed run and a CUDA-graph run must equal the eager uninterrupted run bit for bit,
on CUDA with deterministic kernels (cuDNN, cuBLAS), and bf16 / fp16 runs are compared with fp32 by
their last epoch's loss and accuracies.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_cli
from weatcli import attacks, train
from weatcli import checkpoint as ckpt
from weatcli import config as config_mod
from weatcli.attacks import attack_mode, engine_options, folded_eval_model, pgd
from weatcli.models import build


def _test_device() -> torch.device | None:
    name = os.environ.get("WEAT_TEST_DEVICE", "").strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return None
    return torch.device(name or "cuda")


os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before it starts
DEVICE = _test_device()
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
DEV = str(DEVICE)
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device (WEAT_TEST_DEVICE=cpu runs this tier on the CPU)"),
]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only (NCCL)")
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}

N_TRAIN, N_TEST, CLASSES, SIZE = 192, 128, 4, 8
BATCH = 16  # 12 batches an epoch: the interrupt test stops at the check after batch 10
PIXEL_DIFF = 1e-4  # two attack results "differ" in a pixel beyond this


@pytest.fixture(autouse=True)
def _backends():
    """As the commands set them up (train.configure_backends): cuDNN autotuning, IEEE fp32 (no TF32);
    on the CPU one thread (a busy 2-core machine is faster so, and it is what the subprocesses get)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_num_threads())
    train.configure_backends(DEVICE, tf32=False)
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved[:3]
    torch.set_num_threads(saved[3])


# ----------------------------------------------------------------------------- data, models, runs


def write_npz(path: Path, seed: int = 0) -> Path:
    """4 classes of 8x8 grey images whose brightness band (overlapping a little) gives the class away."""
    rng = np.random.default_rng(seed)

    def split(n: int):
        y = rng.integers(0, CLASSES, n)
        x = (rng.integers(0, 80, (n, SIZE, SIZE, 1)) + 55 * y[:, None, None, None]).astype(np.uint8)
        return x, y

    (xt, yt), (xv, yv) = split(N_TRAIN), split(N_TEST)
    np.savez(path, x_train=xt, y_train=yt, x_test=xv, y_test=yv)
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


def run_config(npz: Path, out: Path, **sets) -> config_mod.RunConfig:
    """TRADES on the tiny npz: 2 epochs of 12 batches, a 2-step attack, on the test device."""
    overrides = {
        "data.dataset": f"npz:{npz}", "train.device": DEV, "train.method": "trades", "train.epochs": 2,
        "train.batch_size": BATCH, "train.lr": 0.05, "train.eval_n": 64, "train.energy_n": 32,
        "attack.steps": 2, "attack.eval_steps": 3, "train.out": str(out),
    }
    overrides.update(sets)
    return config_mod.resolve(preset="digits-weat", overrides=overrides)


def train_args(npz: Path, out: Path, method: str = "trades") -> list[str]:
    """`weat train` flags of run_config(), one epoch."""
    return ["--preset", "digits-weat", "--dataset", f"npz:{npz}", "--device", DEV, "--method", method,
            "--epochs", "1", "--batch-size", str(BATCH), "--lr", "0.05", "--eval-n", "64", "--set", "train.energy_n=32",
            "--set", "attack.steps=2", "--set", "attack.eval_steps=3", "--out", str(out)]


@contextmanager
def deterministic():
    """On CUDA: deterministic kernels (torch.use_deterministic_algorithms, cuDNN's deterministic
    algorithms), so that two runs in this process can be compared bit for bit. Yields the warnings
    of ops that have no deterministic version (they run anyway), for the failure message."""
    if not ON_CUDA:
        yield []
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic = saved[2]


@pytest.fixture(scope="module")
def reference(npz, tmp_path_factory) -> train.FitResult:
    """The fp32 eager run every other training test is compared with (deterministic kernels on
    CUDA); its model is also the one attack and sample run on."""
    with deterministic():
        return train.fit(run_config(npz, tmp_path_factory.mktemp("reference") / "run"))


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.read(path)[0]


def _relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every floating-point tensor of two state dicts."""
    keys = [k for k in b if b[k].is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    den = sum(float(b[k].double().pow(2).sum()) for k in keys)
    return math.sqrt(num / max(den, 1e-30))


def _model_and_batch(seed: int = 0, n: int = 64 if ON_CUDA else 32, arch: str = "small-cnn", size: int = 16, channels: int = 1):
    """A model with non-trivial batch-norm statistics, in eval mode on the device, and a batch."""
    torch.manual_seed(seed)
    model = build(arch, num_classes=10, in_channels=channels, image_size=size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    model = model.to(DEVICE).eval()
    x = torch.rand(n, channels, size, size, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (n,), generator=g).to(DEVICE)
    if ON_CUDA:  # the layout training and the folded eval model use
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, y


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _objective(logits: torch.Tensor, y: torch.Tensor, objective: str, p_nat: torch.Tensor | None) -> torch.Tensor:
    """Mean of the attack objective (what PGD ascends, or descends when targeted)."""
    logits = logits.float()
    if objective == "kl":
        return (p_nat * (p_nat.clamp_min(1e-12).log() - F.log_softmax(logits, 1))).sum(1).mean()
    return F.cross_entropy(logits, y)


def _in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    delta = (x_adv - x).flatten(1).float()
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5, float(size.max())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def _agree(model, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, *, objective: str = "ce",
           p_nat: torch.Tensor | None = None, frac: float, rel: float) -> None:
    """Two attacks' points agree: at most `frac` of the pixels differ beyond rounding, and the
    objective they reach agrees to `rel`."""
    differ = float(((a.float() - b.float()).abs() > PIXEL_DIFF).float().mean())
    assert differ <= frac, f"{differ:.2%} of the pixels differ (allowed {frac:.2%})"
    with torch.no_grad():
        la, lb = (float(_objective(model(t), y, objective, p_nat)) for t in (a, b))
    assert math.isfinite(la) and la == pytest.approx(lb, rel=rel, abs=1e-4)


def _assert_captured(model: nn.Module) -> None:
    """On CUDA the graph path really captured (a soft check: skipped if the engine's private
    registry of captured steps is renamed)."""
    graphs = getattr(attacks, "_GRAPHS", None)
    if ON_CUDA and graphs is not None:
        assert model in graphs and len(graphs[model]) >= 1, "no CUDA graph was captured"


# ----------------------------------------------------------------------------- the attack engine

GRAPH_CASES = [  # norm, objective, targeted, precision
    ("linf", "ce", False, "fp32"),
    ("linf", "kl", False, "fp32"),
    ("l2", "ce", False, "fp32"),
    ("linf", "ce", True, "fp32"),
    ("linf", "ce", False, "bf16"),
    ("linf", "kl", False, "bf16"),
]


def _autocast(precision: str):
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return torch.autocast(DEVICE.type, dtype=dtypes[precision]) if precision in dtypes else nullcontext()


@pytest.mark.parametrize("norm,objective,targeted,precision", GRAPH_CASES,
                         ids=["-".join([n, o, "targeted" if t else "untargeted", p]) for n, o, t, p in GRAPH_CASES])
def test_cuda_graph_pgd_matches_the_eager_loop(norm, objective, targeted, precision):
    model, x, y = _model_and_batch()
    _, x2, y2 = _model_and_batch(seed=1)
    eps, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.125)
    kw = dict(eps=eps, step_size=step, steps=10, norm=norm, objective=objective, targeted=targeted, init="uniform")
    # Measured on the CPU with a 1e-6 relative nudge of the weights standing in for other kernels'
    # rounding (10 steps, KL the most sensitive): fp32 0.3% of the pixels differ, bf16 8%.
    frac, rel = (0.02, 0.02) if precision == "fp32" else (0.15, 0.05)
    with attack_mode(model), _autocast(precision):
        runs = []
        for xb, yb, seed in ((x, y, 1), (x2, y2, 2)):
            goal = (yb + 1) % 10 if targeted else yb
            with torch.no_grad():
                p_nat = F.softmax(model(xb).float(), 1) if objective == "kl" else None
            eager = pgd(model, xb, goal, p_nat=p_nat, generator=_gen(seed), **kw)
            with engine_options(cuda_graphs=True):  # the second batch replays the graph the first captured
                graphed = pgd(model, xb, goal, p_nat=p_nat, generator=_gen(seed), **kw)
            runs.append((xb, goal, p_nat, eager, graphed))
    _assert_captured(model)
    with torch.no_grad():
        for xb, goal, p_nat, eager, graphed in runs:
            _in_ball(graphed, xb, eps, norm)
            assert float((graphed - xb).abs().max()) > 0  # it moved
            _agree(model, graphed, eager, goal, objective=objective, p_nat=p_nat, frac=frac, rel=rel)


def test_cuda_graph_follows_in_place_weight_updates():
    """Training updates the weights in place (fused SGD) between the replays of one captured step."""
    model, x, y = _model_and_batch()
    kw = dict(eps=8 / 255, step_size=2 / 255, steps=5, init="uniform")
    with attack_mode(model):
        with engine_options(cuda_graphs=True):
            before = pgd(model, x, y, generator=_gen(3), **kw)  # captured with the old weights
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-1.0)  # the new weights; the same storage
            after = pgd(model, x, y, generator=_gen(3), **kw)
        eager = pgd(model, x, y, generator=_gen(3), **kw)
    _assert_captured(model)
    with torch.no_grad():
        _agree(model, after, eager, y, frac=0.01, rel=0.02)
        assert float(((after - before).abs() > PIXEL_DIFF).float().mean()) > 0.2  # the weights did matter


@pytest.mark.parametrize("arch,size,channels", [("small-cnn", 16, 1), ("resnet18", 32, 3)])
def test_folded_eval_model_on_the_device(arch, size, channels):
    """attacks.folded_eval_model (what `weat attack` and `weat sample` run) folds batch norm on this
    device and computes the model's function: logits, input gradients and PGD points."""
    model, x, y = _model_and_batch(arch=arch, size=size, channels=channels, n=16 if arch == "resnet18" else 64)
    folded = folded_eval_model(model, x[:8])
    assert folded is not model, "folding fell back to the unfolded model (it failed its own check on this device)"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref, out = model(x).float(), folded(x).float()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))
    grads = []
    for m in (model, folded):
        with attack_mode(m):
            xg = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(m(xg).float(), y), xg)
        grads.append(g)
    scale = float(grads[0].abs().max())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * scale)
    if arch == "small-cnn":
        kw = dict(eps=8 / 255, step_size=2 / 255, steps=10, init="uniform")
        with attack_mode(model), attack_mode(folded):
            a, b = pgd(folded, x, y, generator=_gen(5), **kw), pgd(model, x, y, generator=_gen(5), **kw)
            _agree(model, a, b, y, frac=0.02, rel=0.02)


def test_sgld_without_noise_on_the_device_matches_the_cpu(reference):
    """The SGLD update on the device and on the CPU from the same start: with the noise off the
    random streams do not enter, and 20 smooth steps stay within float rounding."""
    from weatcli.sampling import sgld

    outs = []
    for dev in (DEVICE, torch.device("cpu")):
        model = ckpt.load(reference.checkpoint, device=dev).model.eval()
        g = torch.Generator().manual_seed(0)
        x0 = torch.rand(32, 1, SIZE, SIZE, generator=g).to(dev)
        y = torch.randint(0, CLASSES, (32,), generator=g).to(dev)
        with attack_mode(model):
            res = sgld(model, x0, y, steps=20, step_size=0.1, noise=0.0, generator=torch.Generator(device=dev).manual_seed(0))
        outs.append(res.x.cpu())
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-4
    assert float((outs[1] - x0.cpu()).abs().max()) > 1e-2  # it moved


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_stays_close_to_fp32(npz, reference, tmp_path, precision):
    result = train.fit(run_config(npz, tmp_path / "run", **{"train.precision": precision}))
    rows, ref_rows = _rows(result.run_dir), _rows(reference.run_dir)
    assert len(rows) == len(ref_rows) and all(math.isfinite(r["train_loss"]) for r in rows)
    row, ref = rows[-1], ref_rows[-1]
    assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=0.1)
    assert abs(row["train_accuracy"] - ref["train_accuracy"]) <= 0.1
    for key in ("clean_accuracy", "robust_accuracy"):  # 64 held-out images
        assert abs(row[key] - ref[key]) <= 0.15, (key, row[key], ref[key])
    weights = _weights(result.run_dir / "last.safetensors")  # master weights stay fp32
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_cuda_graph_training_matches_eager_training(npz, reference, tmp_path):
    """--cuda-graphs: the training attack, the evaluation and the energy tracking replay captured steps."""
    with deterministic() as nondeterministic:
        result = train.fit(run_config(npz, tmp_path / "run", **{"train.cuda_graphs": True}))
    _compare_runs(result.run_dir, reference.run_dir, nondeterministic)


def _compare_runs(run: Path, ref: Path, nondeterministic: list) -> None:
    """Bit for bit: the same kernels on the same data from the same generators."""
    mine, theirs = _weights(run / "last.safetensors"), _weights(ref / "last.safetensors")
    assert mine.keys() == theirs.keys()
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    ops = sorted({str(w.message).split(" does not")[0] for w in nondeterministic if "deterministic" in str(w.message)})
    assert not differ, (f"{len(differ)} of {len(mine)} tensors differ (first {differ[0]}; relative distance "
                        f"{_relative_distance(mine, theirs):.2e}); ops without a deterministic version: {ops or 'none'}")
    assert _rows(run) == _rows(ref)


def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(npz, reference, tmp_path):
    run = tmp_path / "run"
    interrupt = train.Interrupt()

    def on_event(kind: str, payload: dict) -> None:
        if kind == "batch" and payload["epoch"] == 1 and payload["batch"] == 10:
            interrupt.requested = True  # as Ctrl-C does: stop after this batch, mid-epoch

    with deterministic() as nondeterministic:
        with pytest.raises(train.TrainingInterrupted):
            train.fit(run_config(npz, run), on_event=on_event, interrupt=interrupt)
        state = json.loads(ckpt.read(run / "last.safetensors")[1]["resume"])
        assert (state["epoch"], state["batch"]) == (0, 10)
        train.fit(None, resume=run)
    _compare_runs(run, reference.run_dir, nondeterministic)


# ----------------------------------------------------------------------------- the commands


def test_weat_attack_pgd_and_autoattack_parts_on_the_device_match_the_cpu(reference, capsys):
    argv = ["attack", str(reference.checkpoint), "-a", "pgd", "-a", "apgd-ce", "-a", "apgd-dlr", "--n", str(N_TEST),
            "--steps", "10", "--batch-size", "64", "--json"]
    results = {}
    for dev in (DEV, "cpu"):
        code, out, err = run_cli([*argv, "--device", dev], capsys)
        assert code == 0, err
        results[dev] = json.loads(out)
    on, cpu = results[DEV], results["cpu"]
    assert list(on["attacks"]) == ["pgd", "apgd-ce", "apgd-dlr"] and on["n"] == N_TEST
    assert abs(on["clean_accuracy"] - cpu["clean_accuracy"]) <= 1 / N_TEST + 1e-9  # the same model, the same images
    for name, result in on["attacks"].items():
        assert 0 <= result["robust_accuracy"] <= on["clean_accuracy"]
        # Other random starts on the device (and, for APGD, other torch seeds): a margin of 8 images.
        assert abs(result["robust_accuracy"] - cpu["attacks"][name]["robust_accuracy"]) <= 8 / N_TEST, name
        assert math.isfinite(result["energy"]["adversarial_mean"])
    assert on["worst_case_accuracy"] <= min(a["robust_accuracy"] for a in on["attacks"].values())


def test_weat_sample_on_the_device_matches_the_cpu(reference, tmp_path, capsys):
    argv = ["sample", str(reference.checkpoint), "--n-per-class", "32", "--sgld-steps", "20", "--init", "uniform", "--json"]
    results = {}
    for dev in (DEV, "cpu"):
        code, out, err = run_cli([*argv, "--device", dev, "--out", str(tmp_path / f"{dev}.safetensors")], capsys)
        assert code == 0, err
        results[dev] = json.loads(out)
    on, cpu = results[DEV], results["cpu"]
    assert on["n"] == cpu["n"] == 32 * CLASSES
    # The same function sampled from other random starts and noise: a statistical comparison.
    assert abs(on["fraction_classified_as_asked"] - cpu["fraction_classified_as_asked"]) <= 0.1
    for key in ("energy_initial_mean", "energy_final_mean"):
        assert on[key] == pytest.approx(cpu[key], rel=0.1, abs=0.3), key
    assert on["energy_final_mean"] < on["energy_initial_mean"]  # SGLD lowered E(x, y)


# ----------------------------------------------------------------------------- compilation, other processes
# The slowest tests come last: a tier stopped by the GPU suite's time budget loses the fewest.


def _c_compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


@pytest.mark.skipif(_c_compiler() is None, reason="no C compiler: inductor / triton cannot build kernels on this machine")
def test_compiled_model_and_fused_update_match_the_eager_loop():
    """--compile: torch.compile'd model and the fused sign-step kernel; on CUDA also with the step
    captured as a graph (--compile --cuda-graphs)."""
    model, x, y = _model_and_batch()
    compiled = torch.compile(model)
    kw = dict(eps=8 / 255, step_size=2 / 255, steps=10, init="uniform")
    with attack_mode(compiled):
        eager = pgd(model, x, y, generator=_gen(4), **kw)
        with engine_options(fused_update=True):
            fused = pgd(compiled, x, y, generator=_gen(4), **kw)
        with engine_options(fused_update=True, cuda_graphs=True):
            graphed = pgd(compiled, x, y, generator=_gen(4), **kw)
    with torch.no_grad():
        for out in (fused, graphed):
            _in_ball(out, x, 8 / 255, "linf")
            _agree(model, out, eager, y, frac=0.05, rel=0.02)


def _weat(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weatcli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=REPO)


def test_weat_train_devices_1_on_the_device(npz, tmp_path):
    out = tmp_path / "run"
    r = _weat("train", *train_args(npz, out), "--devices", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out / "model.safetensors")
    assert len(_rows(out)) == 1 and f"({DEVICE}" in r.stderr  # trained on the device asked for


def test_the_launcher_runs_a_worker_on_the_device(npz, tmp_path):
    """weat's launcher (torchrun's elastic_launch, what --devices N uses) with one worker."""
    out = tmp_path / "run"
    code = f"from weatcli.distributed import launch; raise SystemExit(launch(1, {['train', *train_args(npz, out)]!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and len(_rows(out)) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@cuda_only
def test_nccl_process_group_and_ddp_run_on_this_gpu(tmp_path):
    """What `--devices N` builds on a GPU machine: an NCCL process group and DistributedDataParallel
    (one rank here: a single GPU cannot hold two NCCL ranks)."""
    script = tmp_path / "nccl.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        dist.init_process_group("nccl")
        torch.cuda.set_device(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2).cuda(), device_ids=[0])
        model(torch.ones(3, 4, device="cuda")).sum().backward()
        t = torch.full((2,), 3.0, device="cuda")
        dist.all_reduce(t)
        dist.barrier()
        assert torch.equal(t.cpu(), torch.full((2,), 3.0)) and model.module.weight.grad is not None
        dist.destroy_process_group()
        print("nccl ok", torch.cuda.nccl.version())
    """))
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "nccl ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(not ON_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl_compute_what_one_process_computes(npz, tmp_path):
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        r = _weat("train", *train_args(npz, out, method="standard"), "--sync-bn", "--devices", str(devices))
        assert r.returncode == 0, r.stderr
        runs[devices] = out
    a, b = (_weights(runs[d] / "last.safetensors") for d in (1, 2))
    for k in a:  # 12 SGD steps from the same start on the same global batches (no attack: no sign steps)
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3, msg=k)
    (one,), (two,) = _rows(runs[1]), _rows(runs[2])
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
