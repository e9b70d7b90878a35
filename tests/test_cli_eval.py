"""`python -m advvit.eval` end to end on a checkpoint written by advvit.checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advvit  # noqa: F401  (before timm)
from advvit import checkpoint as C
from advvit import data as D
from advvit import eval as E
from advvit.attack_names import parse_attack
from advvit.cli.options import parse_eps
from advvit.data import select_indices
from advvit.suites import run_attack
from advvit import robustness as R
from advvit.models import create_model

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]
MEAN_STD = ((0.2860,), (0.3530,))


pytestmark = pytest.mark.usefixtures("one_thread")


def _test_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = D.create_dataset("fashion_mnist", FMNIST, split="val")
    loader = D.create_loader(ds.subset(list(range(n))), img_size=32, in_chans=1, batch_size=n,
                             is_training=False)
    return next(iter(loader))


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    """A timm test ViT (normalization inside) trained for a few seconds, saved as a checkpoint."""
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST}")
    torch.manual_seed(0)
    train = D.create_dataset("fashion_mnist", FMNIST, split="train")
    loader = D.create_loader(train.subset(list(range(2048))), img_size=32, in_chans=1,
                             batch_size=64, is_training=False)
    model = create_model("test_vit", num_classes=10, in_chans=1, img_size=32, normalize=MEAN_STD)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    model.train()
    for _ in range(2):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    spec = C.ModelSpec("test_vit", 10, 1, 32, MEAN_STD)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    C.save_checkpoint(path, C.make_checkpoint(model, spec, config={"dataset": "fashion_mnist", "data_dir": str(FMNIST)}, epoch=2,
                                              step=64, train_norm="linf", train_eps=0.0))
    return path


def _run(args: list[str]) -> dict:
    assert E.main(args) == 0
    out = args[args.index("--output") + 1]
    return json.loads(Path(out).read_text())


def _base(ckpt: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--dataset", "fashion_mnist", "--data-dir", str(FMNIST),
            "--n-examples", "24", "--batch-size", "12", "--device", "cpu",
            "--output", str(tmp_path / "report.json"), *extra]


@pytest.mark.slow
def test_apgd_ce_report_end_to_end(ckpt_path, tmp_path, capsys):
    report = _run(_base(ckpt_path, tmp_path, "--attack", "apgd-ce", "--steps", "10",
                        "--restarts", "1", "--eps", "2/255", "--per-example",
                        "--save-adv", str(tmp_path / "adv.pt")))
    # the clean number is the model's real accuracy on those 24 test images
    model, _ = C.create_model_from_checkpoint(ckpt_path)
    x, y = _test_images(24)
    with torch.no_grad():
        clean = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert report["clean_accuracy"] == pytest.approx(clean)
    assert 0.3 < clean  # it learned something in a few seconds
    robust = report["robust_accuracy"]["value"]
    assert robust <= clean
    assert report["n"] == 24 and report["eps"] == pytest.approx(2 / 255)
    assert report["attack"]["norm"] == "linf" and report["attack"]["seed"] == 0
    assert report["results"][0]["attacks"][0]["settings"] == {"n_iter": 10, "n_restarts": 1}
    assert report["model"]["sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert report["model"]["normalize"] == [list(MEAN_STD[0]), list(MEAN_STD[1])] or \
        report["model"]["normalize"] == [MEAN_STD[0], MEAN_STD[1]]
    assert {"torch", "timm", "advvit", "autoattack"} <= set(report["versions"])
    per = report["per_example"]
    assert [p["index"] for p in per] == list(range(24))
    assert sum(p["robust"] for p in per) / 24 == pytest.approx(robust)
    assert all(p["clean"] or not p["robust"] for p in per)
    adv = torch.load(tmp_path / "adv.pt")
    assert (adv["x_adv"] - x).abs().max() <= 2 / 255 + 1e-6
    with torch.no_grad():
        assert torch.equal(model(adv["x_adv"]).argmax(1) == y, adv["robust"])
    assert "robust" in capsys.readouterr().out  # the console table
    assert report["headline"] is None and report["robust_accuracy"]["trustworthy"] is True
    (row,) = report["results"][0]["attacks"]
    assert row["status"] == "ran" and row["n_attacked"] == round(clean * 24)


@pytest.mark.slow
def test_same_seed_same_report(ckpt_path, tmp_path):
    args = ("--attack", "apgd-ce,apgd-t", "--steps", "5", "--restarts", "1", "--eps", "4/255",
            "--per-example")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _run(_base(ckpt_path, tmp_path / "a", *args))
    b = _run(_base(ckpt_path, tmp_path / "b", *args))
    assert a["per_example"] == b["per_example"]
    assert [s["name"] for s in a["results"][0]["attacks"]] == ["apgd-ce", "apgd-t"]
    assert a["results"][0]["attacks"][1]["settings"]["n_target_classes"] == 9


def test_pgd_eps_sweep_with_plot(ckpt_path, tmp_path):
    report = _run(_base(ckpt_path, tmp_path, "--attack", "pgd", "--steps", "5",
                        "--eps-sweep", "0,2/255,0.1"))
    res = report["results"]
    assert [r["eps"] for r in res] == pytest.approx([0, 2 / 255, 0.1])
    assert res[0]["robust_accuracy"]["value"] == res[0]["clean_accuracy"]  # eps 0
    # eps 0 is not attacked: recorded as such, no time spent
    assert res[0]["attacks"][0]["status"] == "skipped" and "eps 0" in res[0]["attacks"][0]["reason"]
    assert res[0]["attacks"][0]["seconds"] == 0 and res[0]["attacks"][0]["n_attacked"] == 0
    assert res[1]["attacks"][0]["n_attacked"] == round(res[1]["clean_accuracy"] * 24)
    accs = [r["robust_accuracy"]["value"] for r in res]
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[2] <= 0.1  # a large eps breaks (nearly) everything
    assert Path(report["plot"]).stat().st_size > 1000


def test_ids_file_selects_examples(ckpt_path, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# chosen\n5\n17\n3\n")
    report = _run(_base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "1/255",
                        "--ids-file", str(ids), "--per-example"))
    assert [p["index"] for p in report["per_example"]] == [5, 17, 3]
    _, y = _test_images(18)
    assert [p["label"] for p in report["per_example"]] == [int(y[5]), int(y[17]), int(y[3])]


def test_threads_option_reaches_torch_and_the_report(ckpt_path, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        report = _run(_base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "1/255",
                            "--threads", "2"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    env = report["environment"]
    assert env["torch_threads"] == 2
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    with pytest.raises(SystemExit) as exit_:
        E.main(_base(ckpt_path, tmp_path, "--attack", "fgsm", "--threads", "0"))
    assert exit_.value.code == 2
    assert "argument --threads: expected auto or a positive integer, got '0'" in \
        capsys.readouterr().err


def test_select_indices_paths_and_random():
    paths = ["n01/a.JPEG", "n01/b.JPEG", "n02/c.JPEG"]
    assert select_indices(3, ids=["n02/c.JPEG", "val/n01/a.JPEG"], paths=paths) == [2, 0]
    with pytest.raises(E.EvalError, match="not in the data split"):
        select_indices(3, ids=["n03/x.JPEG"], paths=paths)
    r1 = select_indices(1000, n_examples=10, sample="random", seed=3)
    assert r1 == select_indices(1000, n_examples=10, sample="random", seed=3)
    assert r1 != select_indices(1000, n_examples=10, sample="random", seed=4)
    assert len(set(r1)) == 10 and r1 == sorted(r1)


def test_parse_eps():
    assert parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps("0.0157") == pytest.approx(0.0157)
    assert parse_eps("3.0", norm="l2") == 3.0
    for bad in ("8", "-1/255", "four"):
        with pytest.raises(E.EvalError, match="--eps"):
            parse_eps(bad)


def test_shards_merge_into_the_whole(ckpt_path):
    model, _ = C.create_model_from_checkpoint(ckpt_path)
    x, y = _test_images(20)
    spec = parse_attack("fgsm")  # deterministic: each example's outcome ignores its batch
    whole = run_attack(model, x, y, spec, eps=2 / 255, batch_size=8)
    parts = []
    for rank in range(3):
        pos = list(range(rank, 20, 3))
        part = run_attack(model, x[pos], y[pos], spec, eps=2 / 255, batch_size=8)
        part.positions = pos
        parts.append(part)
    merged = R.merge_outcomes(parts)
    assert torch.equal(merged.clean, whole.clean)
    assert torch.equal(merged.robust, whole.robust)
    assert merged.broken_by == whole.broken_by


@pytest.mark.slow
def test_torchrun_two_ranks_share_one_evaluation(ckpt_path, tmp_path):
    """Two gloo processes, as torchrun starts them; rank 0 writes the merged report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    args = [sys.executable, "-m", "advvit.eval", *_base(ckpt_path, tmp_path, "--attack", "fgsm",
                                                          "--eps", "2/255", "--per-example")]
    args[args.index("--output") + 1] = str(out)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["n"] == 24
    single = _run(_base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "2/255",
                        "--per-example"))
    assert report["per_example"] == single["per_example"]
    assert report["clean_accuracy"] == single["clean_accuracy"]


@pytest.mark.parametrize("change, match", [
    (("--checkpoint", "/no/such/model.pth"), "--checkpoint /no/such/model.pth does not exist"),
    (("--attack", "cw"), "--attack 'cw' is unknown"),
    (("--eps", "8"), "did you mean 8/255"),
    (("--eps", "-0.1"), "--eps"),
    (("--attack", "autoattack", "--steps", "10"), "as published"),
    (("--attack", "pgd", "--state-path", "s.json"), "--state-path"),
    (("--n-examples", "100000"), "more than the 10000 examples"),
    (("--batch-size", "0"), "--batch-size"),
    (("--norm", "l2", "--eps", "40"), "--eps 40 is above 32, the L2 diagonal of a 1x32x32 input"),
    (("--norm", "l2", "--eps-sweep", "1,33"), "--eps-sweep 33 is above 32"),
    (("--norm", "l1", "--eps", "1100"), "--eps 1100 is above 1024, the L1 diagonal of a 1x32x32"),
    (("--amp", "fp16"), "--amp fp16 needs a CUDA --device"),
    (("--threats", "linf4/255"), "'linf4/255' is not NORM:EPS"),
    (("--threats", "linf:4/255,l0:3"), "'l0' is not a norm: use linf, l2, l1"),
    (("--threats", "linf:4/255,l1:1100"), "--threats 1100 is above 1024, the L1 diagonal"),
    (("--threats", "linf:8"), "--threats 8 is above 1"),
    (("--threats", "l2:1,l2:1.0"), "names a threat twice"),
    (("--threats", "l2:1", "--eps-sweep", "0,1/255"), "--threats and --eps-sweep"),
    (("--threats", "l2:1", "--save-adv", "a.pt"), "--save-adv keeps one threat's"),
    (("--attack", "autoattack-rand", "--restarts", "2"), "as published"),
    (("--output", "/proc/version/report.json"), "is a file, not a folder"),
])
def test_bad_input_gets_one_clear_error(ckpt_path, tmp_path, capsys, change, match):
    args = _base(ckpt_path, tmp_path)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        E.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err
    assert not (tmp_path / "report.json").exists()


def _refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        E.main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_folder_damaged_or_non_finite_weights_are_refused(ckpt_path, tmp_path, capsys):
    from test_checkpoint import _flip_bytes_of

    err = _refused(_base(tmp_path, tmp_path, "--attack", "fgsm"), capsys)
    assert f"--checkpoint {tmp_path} is a folder" in err and str(tmp_path / "best.pth") in err
    ckpt = C.load_checkpoint(ckpt_path)
    key = max(ckpt["model"], key=lambda k: ckpt["model"][k].numel())
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(ckpt_path.read_bytes())
    _flip_bytes_of(damaged, ckpt["model"][key])
    err = _refused(_base(damaged, tmp_path, "--attack", "fgsm"), capsys)
    assert f"--checkpoint: {damaged} (model): tensors fail their checksum: ['{key}']" in err
    nan = tmp_path / "nan.pth"
    ckpt["model"][key][0] = float("nan")
    C.save_checkpoint(nan, ckpt)
    err = _refused(_base(nan, tmp_path, "--attack", "fgsm"), capsys)
    assert f"--checkpoint: {nan} (model): " in err and f"non-finite values (NaN or infinite) in tensor {key}" in err
    weights = tmp_path / "nan_weights.pth"
    torch.save(ckpt["model"], weights)
    args = _base(nan, tmp_path, "--attack", "fgsm")
    i = args.index("--checkpoint")
    args[i:i + 2] = ["--model", "test_vit", "--weights", str(weights), "--img-size", "32"]
    err = _refused(args, capsys)
    assert f"--weights: {weights}: " in err and "non-finite values" in err
    assert not (tmp_path / "report.json").exists()


def test_mismatched_data_is_refused(tmp_path, capsys):
    """A 5-class model on a 10-class data set: refused before any attack."""
    model = create_model("test_vit", num_classes=5, in_chans=1, img_size=32)
    path = tmp_path / "five.pth"
    C.save_checkpoint(path, C.make_checkpoint(model, C.ModelSpec("test_vit", 5, 1, 32, None),
                                              config={}, epoch=0, step=0))
    with pytest.raises(SystemExit):
        E.main(_base(path, tmp_path, "--attack", "fgsm"))
    assert "has 5 classes" in capsys.readouterr().err


def test_missing_dataset_is_refused(ckpt_path, tmp_path, capsys):
    args = _base(ckpt_path, tmp_path)
    args[args.index("--data-dir") + 1] = str(tmp_path / "nothing-here")
    with pytest.raises(SystemExit):
        E.main(args)
    assert "--dataset fashion_mnist" in capsys.readouterr().err


def test_timm_name_with_weights_file_equals_the_checkpoint(ckpt_path, tmp_path):
    from safetensors.torch import save_file

    from advvit.models import unwrap

    model, _ = C.create_model_from_checkpoint(ckpt_path)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in unwrap(model).state_dict().items()}, str(weights))
    from_ckpt = _run(_base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "1/255"))
    args = _base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "1/255")
    i = args.index("--checkpoint")
    args[i:i + 2] = ["--model", "test_vit", "--weights", str(weights), "--img-size", "32",
                     "--mean", "0.2860", "--std", "0.3530"]
    from_timm = _run(args)
    assert from_timm["model"]["source"] == "timm"
    assert from_timm["clean_accuracy"] == from_ckpt["clean_accuracy"]
    assert from_timm["robust_accuracy"] == from_ckpt["robust_accuracy"]


def test_state_path_resumes_and_refuses_another_run(ckpt_path, tmp_path, capsys):
    state = tmp_path / "aa_state.json"
    args = _base(ckpt_path, tmp_path, "--attack", "apgd-ce", "--steps", "5", "--restarts", "1",
                 "--eps", "2/255", "--state-path", str(state), "--per-example")
    first = _run(args)
    saved = json.loads(state.read_text())
    assert [d["name"] for d in saved["done"]] == ["apgd-ce"]
    again = _run(args)  # everything is in the state: nothing re-attacked, same outcome
    assert again["per_example"] == first["per_example"]
    args[args.index("--eps") + 1] = "3/255"
    with pytest.raises(SystemExit):
        E.main(args)
    assert "belongs to another evaluation" in capsys.readouterr().err


def _aa_args(ckpt: Path, tmp_path: Path, state: Path, *extra: str) -> list[str]:
    return _base(ckpt, tmp_path, "--attack", "apgd-ce", "--steps", "1", "--restarts", "1",
                 "--state-path", str(state), *extra)


def test_a_state_file_of_a_changed_checkpoint_is_refused(ckpt_path, tmp_path, capsys):
    state = tmp_path / "aa_state.json"
    changed = tmp_path / "changed.pth"
    changed.write_bytes(ckpt_path.read_bytes())
    _run(_aa_args(changed, tmp_path, state, "--eps", "2/255"))
    ckpt = C.load_checkpoint(changed)
    ckpt["model"]["head.bias"] += 0.01  # retrained in place: same path, other weights
    C.save_checkpoint(changed, ckpt)
    before = state.read_bytes()
    err = _refused(_aa_args(changed, tmp_path, state, "--eps", "2/255"), capsys)
    assert f"--state-path: state file {state} belongs to another evaluation (it was written " \
           "for other model weights" in err and "delete it" in err
    assert state.read_bytes() == before
    # One file, two models: its EMA weights, and with --no-ema its raw ones.
    ckpt["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    C.save_checkpoint(changed, ckpt)
    state.unlink()
    _run(_aa_args(changed, tmp_path, state, "--eps", "2/255"))
    err = _refused(_aa_args(changed, tmp_path, state, "--eps", "2/255", "--no-ema"), capsys)
    assert "written for other model weights" in err


def test_a_state_path_holding_random_bytes_is_refused_and_kept(ckpt_path, tmp_path, capsys):
    state = tmp_path / "aa_state.json"
    junk = os.urandom(2048)
    state.write_bytes(junk)
    err = _refused(_aa_args(ckpt_path, tmp_path, state, "--eps", "2/255"), capsys)
    assert f"--state-path: {state} is not an advvit evaluation state file" in err
    assert "give another --state-path" in err and "Traceback" not in err
    assert state.read_bytes() == junk and not (tmp_path / "report.json").exists()


def test_a_sweep_stopped_by_a_state_file_keeps_the_eps_it_evaluated(ckpt_path, tmp_path, capsys):
    state = tmp_path / "aa_state.json"
    args = _aa_args(ckpt_path, tmp_path, state, "--eps-sweep", "0,2/255")
    _run(args)
    first, second = Path(f"{state}.eps0"), Path(f"{state}.eps0.00784314")
    kept = first.read_bytes()
    second.write_bytes(b"\x00garbage")
    (tmp_path / "report.json").unlink()
    assert E.main(args) == 1
    err = capsys.readouterr().err
    assert f"{second} is not an advvit evaluation state file" in err
    assert "eps 0 are complete in their state files: a rerun resumes them" in err
    assert first.read_bytes() == kept and not (tmp_path / "report.json").exists()


def test_data_set_defaults_to_the_checkpoints_training_data(ckpt_path, tmp_path):
    args = _base(ckpt_path, tmp_path, "--attack", "pgd", "--steps", "2", "--eps", "4/255")
    for flag in ("--dataset", "--data-dir"):
        i = args.index(flag)
        del args[i:i + 2]
    report = _run(args)
    assert report["data"]["dataset"] == "fashion_mnist"
    assert report["data"]["data_dir"] == str(FMNIST)


@pytest.mark.slow
def test_output_folders_are_created(ckpt_path, tmp_path):
    args = _base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "1/255",
                 "--eps-sweep", "0,1/255", "--save-adv", str(tmp_path / "adv" / "x.pt"))
    args[args.index("--output") + 1] = str(tmp_path / "new" / "deeper" / "report.json")
    report = _run(args)
    assert (tmp_path / "new" / "deeper" / "report.png").stat().st_size > 1000
    assert report["plot"] == str(tmp_path / "new" / "deeper" / "report.png")
    assert torch.load(tmp_path / "adv" / "x.pt")["x_adv"].shape == (24, 1, 32, 32)
    # nothing but the files themselves: no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == \
        ["report.json", "report.png"]


def test_l1_evaluation_runs_autoattacks_l1_attack_and_stays_in_ball_and_box(ckpt_path,
                                                                           tmp_path):
    eps = 8.0
    report = _run(_base(ckpt_path, tmp_path, "--norm", "l1", "--eps", "8", "--attack",
                        "apgd-ce", "--steps", "10", "--restarts", "1", "--save-adv",
                        str(tmp_path / "adv.pt")))
    assert report["attack"]["norm"] == "l1" and report["attack"]["attacks"] == ["apgd-ce"]
    assert report["robust_accuracy"]["value"] < report["clean_accuracy"]
    saved = torch.load(tmp_path / "adv.pt")
    x, _ = _test_images(24)
    delta = (saved["x_adv"] - x).flatten(1)
    assert saved["x_adv"].min() >= 0 and saved["x_adv"].max() <= 1
    assert delta.abs().sum(1).max() <= eps + 1e-4


def test_threats_give_a_row_each_and_their_union(ckpt_path, tmp_path, capsys):
    attack = ["--attack", "apgd-ce", "--steps", "5", "--restarts", "1", "--per-example"]
    report = _run(_base(ckpt_path, tmp_path, "--threats", "linf:2/255,l2:0.5,l1:4", *attack))
    rows = report["results"]
    assert [(r["threat"], r["norm"]) for r in rows] == \
        [("linf:2/255", "linf"), ("l2:0.5", "l2"), ("l1:4", "l1")]
    assert [r["eps"] for r in rows] == pytest.approx([2 / 255, 0.5, 4.0])
    assert report["attack"]["norm"] == "linf,l2,l1"
    per = report["per_example"]
    for r in rows:
        robust = [p["threats"][r["threat"]]["robust"] for p in per]
        assert sum(robust) / len(per) == pytest.approx(r["robust_accuracy"]["value"])
    union = [all(t["robust"] for t in p["threats"].values()) for p in per]
    assert [p["robust"] for p in per] == union
    assert report["union"]["n_robust"] == sum(union)
    assert report["union"]["robust_accuracy"]["value"] == pytest.approx(sum(union) / len(per))
    assert report["union"]["robust_accuracy"]["value"] <= \
        min(r["robust_accuracy"]["value"] for r in rows)
    assert "every threat" in capsys.readouterr().out
    # A row is the evaluation of that threat alone.
    alone = _run(_base(ckpt_path, tmp_path, "--norm", "l1", "--eps", "4", *attack))
    assert [p["robust"] for p in alone["per_example"]] == \
        [p["threats"]["l1:4"]["robust"] for p in per]


def test_a_bf16_evaluation_says_so_and_each_break_fools_the_fp32_model(ckpt_path, tmp_path,
                                                                     capsys):
    report = _run(_base(ckpt_path, tmp_path, "--amp", "bf16", "--attack", "apgd-ce", "--steps",
                        "5", "--restarts", "1", "--eps", "4/255", "--save-adv",
                        str(tmp_path / "adv.pt")))
    assert report["attack"]["precision"]["attack"] == "bf16"
    assert report["attack"]["precision"]["verified"] == "fp32"
    assert report["results"][0]["attacks"][0]["false_breaks"] >= 0
    assert "verified in fp32" in capsys.readouterr().out
    model, _ = C.create_model_from_checkpoint(ckpt_path)
    x, y = _test_images(24)
    adv = torch.load(tmp_path / "adv.pt")
    with torch.no_grad():
        assert torch.equal(model.eval()(adv["x_adv"]).argmax(1) == y, adv["robust"])


def test_l2_eps_at_the_input_diagonal_is_accepted():
    assert parse_eps("3.0", norm="l2") == 3.0  # ImageNet's usual L2 radius
    assert parse_attack("autoattack-rand").version == "rand"


class DetachesInput(nn.Module):
    """A forward that cuts its input from the graph: gradient attacks cannot run on it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.detach())


@pytest.mark.slow
@pytest.mark.parametrize("attack", [("apgd-ce", "--steps", "5", "--restarts", "1"),
                                    ("pgd", "--steps", "3")])
def test_model_that_detaches_its_input_gets_a_report_led_by_the_masking_flag(
        ckpt_path, tmp_path, monkeypatch, capsys, attack):
    real = C.create_model_from_checkpoint

    def detached(*args, **kwargs):
        model, spec = real(*args, **kwargs)
        return DetachesInput(model), spec

    monkeypatch.setattr(C, "create_model_from_checkpoint", detached)
    report = _run(_base(ckpt_path, tmp_path, "--attack", *attack, "--eps", "2/255"))
    assert list(report)[:2] == ["format", "headline"]
    assert report["headline"]["code"] == "gradient_masking"
    assert {"attack_failed", "zero_gradients"} <= set(report["headline"]["flags"])
    (row,) = report["results"][0]["attacks"]
    assert row["status"] == "failed" and row["n_attacked"] == 0
    assert "no gradient with respect to its input" in row["reason"]
    # the examples it could not attack count as not broken; the clean number is the model's
    model, _ = real(ckpt_path)
    x, y = _test_images(24)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert report["clean_accuracy"] == pytest.approx(clean)
    assert report["robust_accuracy"]["value"] == report["clean_accuracy"]
    assert report["robust_accuracy"]["trustworthy"] is False
    assert "attack_failed" in report["robust_accuracy"]["warnings"]
    table = capsys.readouterr().out
    assert table.lstrip().startswith("!!! ROBUST ACCURACY IS UNTRUSTWORTHY")
    (robust_line,) = [ln for ln in table.splitlines() if ln.split()[:1] == ["robust"]]
    assert robust_line.endswith("UNTRUSTWORTHY")


@pytest.mark.parametrize("name", ["junk.pth", "junk.safetensors"])
def test_damaged_weights_file_is_one_clear_error(ckpt_path, tmp_path, capsys, name):
    """Random bytes as --weights: exit 2 naming the file, never torch's weights_only=False advice
    (that would run code from an untrusted file)."""
    junk = tmp_path / name
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    args = _base(ckpt_path, tmp_path, "--attack", "fgsm")
    i = args.index("--checkpoint")
    args[i:i + 2] = ["--model", "test_vit", "--weights", str(junk), "--img-size", "32"]
    with pytest.raises(SystemExit) as exit_info:
        E.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(junk) in err and "weights_only" not in err and "Traceback" not in err


# ------------------------------------------------------------------------ --corruptions

CORRUPT = ("--corruptions", "gaussian_noise,contrast", "--corruption-severities", "1,5",
           "--corruption-workers", "0")


@pytest.mark.slow
def test_corruptions_join_the_lp_report_on_the_same_examples(ckpt_path, tmp_path, capsys):
    from advvit.analysis.shifts import corrupt
    cache = tmp_path / "cache"
    report = _run(_base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "1/255", *CORRUPT,
                        "--corruption-cache-dir", str(cache)))
    c = report["corruptions"]
    assert c["corruptions"] == ["gaussian_noise", "contrast"] and c["severities"] == [1, 5]
    assert c["n"] == report["n"] == 24 and c["seed"] == 0
    assert c["clean_accuracy"] == pytest.approx(report["clean_accuracy"])  # the same examples
    model, _ = C.create_model_from_checkpoint(ckpt_path)
    x, y = _test_images(24)
    with torch.no_grad():
        hit = (model(corrupt(x, "gaussian_noise", 5, seed=0)).argmax(1) == y).float().mean().item()
    assert c["accuracy"]["gaussian_noise"][1] == pytest.approx(hit)
    assert c["mean_corruption_accuracy"] == pytest.approx(np.mean([v for a in c["accuracy"].values() for v in a]))
    assert c["cache_dir"] == str(cache) and len(list(cache.glob("*/*.npy"))) == 4
    table = capsys.readouterr().out
    assert "common corruptions" in table and "gaussian_noise" in table and "mean corruption" in table
    assert table.index("robust") < table.index("common corruptions")  # next to the Lp results


@pytest.mark.slow
def test_without_corruptions_the_report_has_none(ckpt_path, tmp_path, capsys):
    report = _run(_base(ckpt_path, tmp_path, "--attack", "fgsm", "--eps", "1/255"))
    assert "corruptions" not in report and "common corruptions" not in capsys.readouterr().out


def test_corruptions_flag_alone_means_all_fifteen():
    from advvit.analysis.shifts import CORRUPTIONS
    args = E.build_parser().parse_args(["--checkpoint", "m.pth", "--corruptions", "--eps", "1/255"])
    assert args.corruptions == "all"
    assert E._corruption_args(args).corruptions == CORRUPTIONS


@pytest.mark.parametrize("change, match", [
    (("--corruptions", "gaussian_noise,rain"), "--corruptions rain is unknown"),
    (("--corruptions", "fog", "--corruption-severities", "1,6"),
     "--corruption-severities 6: severities are integers 1 to 5"),
    (("--corruptions", "fog", "--corruption-severities", "0"), "--corruption-severities 0"),
    (("--corruptions", "fog", "--corruption-workers", "-2"), "--corruption-workers must be >= 0"),
    (("--corruptions", "fog", "--seed", "-1"), "--seed must be >= 0 with --corruptions"),
    (("--corruptions", "fog", "--corruption-cache-dir", "/proc/version"),
     "--corruption-cache-dir /proc/version is a file"),
    (("--corruption-severities", "1",), "go with --corruptions"),
])
def test_bad_corruption_options_exit_2_before_any_attack(ckpt_path, tmp_path, capsys, monkeypatch,
                                                         change, match):
    attacked = []
    monkeypatch.setattr(E, "run_attack", lambda *a, **k: attacked.append(1))
    with pytest.raises(SystemExit) as exit_info:
        E.main(_base(ckpt_path, tmp_path, "--attack", "fgsm", *change))
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
    assert not attacked and not (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_compiled_pgd_gives_eagers_outcomes_and_records_its_compiles(ckpt_path, tmp_path,
                                                                   capsys):
    # 10 examples in batches of 4: the last batch (2) is a new batch size. Outcomes, not
    # logits, are compared: inductor's kernels may round differently from eager's.
    args = ["--attack", "pgd", "--steps", "3", "--eps", "4/255", "--per-example",
            "--n-examples", "10", "--batch-size", "4"]
    eager = _run(_base(ckpt_path, tmp_path, *args))
    assert "compile" not in eager
    compiled = _run(_base(ckpt_path, tmp_path / "c", *args, "--compile"))
    assert [p["robust"] for p in compiled["per_example"]] == \
        [p["robust"] for p in eager["per_example"]]
    counts = compiled["compile"]
    assert counts["frames_compiled"] >= 1 and counts["graph_breaks"] >= 0
    assert counts["frames_run_eagerly"] == 0  # no recompile limit reached: all of it compiled
    assert counts["recompiles"] >= counts["recompiles_batch_size"] >= 1
    assert "torch.compile:" in capsys.readouterr().out


def test_compile_without_a_cpp_compiler_is_one_clear_error(ckpt_path, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setattr("advvit.compiled.shutil.which", lambda name: None)
    err = _refused(_base(ckpt_path, tmp_path, "--compile"), capsys)
    assert "--compile: torch.compile's CPU back end needs a C++ compiler" in err
    assert "apt-get install g++" in err and not (tmp_path / "report.json").exists()
