"""Checkpoints: round trip, exact-resume state, validation messages, atomic saves, plain-timm export."""
import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import advvit  # noqa: F401  (before timm: the torchvision guard)
import timm
import timm.scheduler
import timm.utils
from advvit import checkpoint as C
from advvit import models as M

REPO = Path(__file__).resolve().parents[1]
NORM = ((0.286,), (0.353,))


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-3
    out: Path = Path("/tmp/run")
    scale: tuple = (0.08, 1.0)


def _trained(arch="test_resnet", normalize=NORM, in_chans=1, img_size=28, **kw):
    torch.manual_seed(0)
    model = M.create_model(arch, num_classes=10, in_chans=in_chans, img_size=img_size, normalize=normalize, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(4, in_chans, img_size, img_size)
    model(x).logsumexp(1).mean().backward()
    opt.step()
    spec = C.ModelSpec(arch, 10, in_chans, img_size, normalize, model_args=kw)
    return model, spec, opt


def _ckpt(tmp_path, name="last.pth", **kw):
    model, spec, opt = _trained(**kw)
    state = C.make_checkpoint(model, spec, config=_Cfg(), epoch=3, step=120, best_metric=0.41,
                              optimizer=opt, train_norm="linf", train_eps=8 / 255)
    path = tmp_path / name
    C.save_checkpoint(path, state)
    return path, model, spec


def test_round_trip_rebuilds_the_same_model_with_its_normalization(tmp_path):
    path, model, spec = _ckpt(tmp_path)
    ckpt = C.load_checkpoint(path)
    assert ckpt["format"] == C.FORMAT and ckpt["epoch"] == 3 and ckpt["step"] == 120
    assert ckpt["best_metric"] == pytest.approx(0.41)
    meta = ckpt["meta"]
    assert meta["input_range"] == [0.0, 1.0] and meta["normalize"] == [[0.286], [0.353]]
    assert meta["train_norm"] == "linf" and meta["train_eps"] == pytest.approx(8 / 255)
    assert set(meta["versions"]) == {"advvit", "timm", "torch"} and meta["versions"]["timm"] == timm.__version__
    assert ckpt["config"] == {"lr": 1e-3, "out": "/tmp/run", "scale": (0.08, 1.0)}
    assert "state" in ckpt["optimizer"] and "rng" in ckpt
    # the weights are the bare timm model's: no wrapper prefix
    assert set(ckpt["model"]) == set(M.unwrap(model).state_dict())
    rebuilt, spec2 = C.create_model_from_checkpoint(path, expected_arch="test_resnet")
    assert spec2 == spec and isinstance(rebuilt, M.NormalizedModel) and not rebuilt.training
    model.eval()
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_checkpoint_without_normalization_and_with_ema(tmp_path):
    model, spec, opt = _trained(arch="xcit_nano_12_p8_32", normalize=None, in_chans=3, img_size=32, depth=1)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # make the EMA weights differ from the model's
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10)
    scaler = torch.amp.GradScaler("cpu")
    state = C.make_checkpoint(model, spec, config={"a": 1}, epoch=0, step=1, optimizer=opt, scheduler=sched,
                              scaler=scaler, ema=ema)
    C.save_checkpoint(tmp_path / "c.pth", state)
    ckpt = C.load_checkpoint(tmp_path / "c.pth")
    assert {"scheduler", "scaler", "ema"} <= set(ckpt)
    sched2 = timm.scheduler.CosineLRScheduler(opt, t_initial=99)
    sched2.load_state_dict(ckpt["scheduler"])
    assert sched2.t_initial == 10
    x = torch.rand(2, 3, 32, 32)
    m_ema, spec2 = C.create_model_from_checkpoint(ckpt, use_ema=True)
    m_raw, _ = C.create_model_from_checkpoint(ckpt, use_ema=False)
    assert spec2.normalize is None and not isinstance(m_ema, M.NormalizedModel)
    torch.testing.assert_close(m_raw(x), model.eval()(x))
    torch.testing.assert_close(m_ema(x), ema.module.eval()(x))


def test_rng_states_restore_exactly(tmp_path):
    model, spec, _ = _trained()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = C.make_checkpoint(model, spec, config={}, epoch=0, step=0)
    C.save_checkpoint(tmp_path / "r.pth", state)
    draw = lambda: (random.random(), float(np.random.rand()), float(torch.rand(1)))  # noqa: E731
    first = draw()
    draw()
    C.restore_rng_state(C.load_checkpoint(tmp_path / "r.pth")["rng"])
    assert draw() == first


def test_spec_must_agree_with_the_model(tmp_path):
    model, spec, _ = _trained()
    with pytest.raises(C.CheckpointError, match="does not match"):
        C.make_checkpoint(model, dataclasses.replace(spec, normalize=((0.5,), (0.5,))), config={}, epoch=0, step=0)
    with pytest.raises(C.CheckpointError, match="not wrapped"):
        C.make_checkpoint(M.unwrap(model), spec, config={}, epoch=0, step=0)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def test_load_errors_say_what_is_wrong(tmp_path):
    path, model, _ = _ckpt(tmp_path)
    with pytest.raises(C.CheckpointError, match="does not exist"):
        C.load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(C.CheckpointError, match="not a file"):
        C.load_checkpoint(tmp_path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(C.CheckpointError, match="truncated or corrupt"):
        C.load_checkpoint(cut)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(C.CheckpointError, match="truncated or corrupt"):
        C.load_checkpoint(junk)
    bare = tmp_path / "bare.pth"
    torch.save(M.unwrap(model).state_dict(), bare)
    with pytest.raises(C.CheckpointError, match="not an advvit checkpoint.*bare state dict"):
        C.load_checkpoint(bare)
    with pytest.raises(C.CheckpointError, match="'test_resnet' model, expected 'xcit_small_12_p4_32'"):
        C.load_checkpoint(path, expected_arch="xcit_small_12_p4_32")


def test_malformed_contents_are_named(tmp_path):
    path, _, _ = _ckpt(tmp_path)
    good = C.load_checkpoint(path)

    def variant(name, **change):
        ckpt = dict(good, **change)
        for k in [k for k, v in change.items() if v is None]:
            del ckpt[k]
        torch.save(ckpt, tmp_path / name)
        return tmp_path / name

    with pytest.raises(C.CheckpointError, match=r"lacks the checkpoint field\(s\) \['spec'\]"):
        C.load_checkpoint(variant("nospec.pth", spec=None))
    with pytest.raises(C.CheckpointError, match="format_version 99"):
        C.load_checkpoint(variant("future.pth", format_version=99))
    weights = dict(good["model"])
    gone = sorted(k for k in weights if k.endswith("conv2.weight"))[-1]
    del weights[gone]
    with pytest.raises(C.CheckpointError, match=rf"missing keys \['{gone}'\]"):
        C.create_model_from_checkpoint(variant("missing.pth", model=weights))
    spec = dict(good["spec"], num_classes=7)
    feat = good["model"]["fc.weight"].shape[1]
    with pytest.raises(C.CheckpointError, match=rf"fc.weight: checkpoint \(10, {feat}\) vs model \(7, {feat}\)"):
        C.create_model_from_checkpoint(variant("classes.pth", spec=spec))
    spec = dict(good["spec"], arch="resnet50_gelu")
    with pytest.raises(C.CheckpointError, match="do not fit 'resnet50_gelu'"):
        C.create_model_from_checkpoint(variant("arch.pth", spec=spec))


def test_objects_outside_plain_data_are_refused_without_unsafe_advice(tmp_path):
    path, _, _ = _ckpt(tmp_path)
    ckpt = C.load_checkpoint(path)
    ckpt["extra"] = {"obj": _Cfg()}  # a class instance: refused by the safe unpickler
    torch.save(ckpt, tmp_path / "obj.pth")
    with pytest.raises(C.CheckpointError, match="holds objects other than plain data.*test_checkpoint._Cfg") as e:
        C.load_checkpoint(tmp_path / "obj.pth")
    assert "weights_only" not in str(e.value) and "save_checkpoint" in str(e.value)
    # A caller who trusts the file can still ask for the full unpickler explicitly.
    assert C.load_checkpoint(tmp_path / "obj.pth", weights_only=False)["extra"]["obj"] == _Cfg()


def test_no_load_error_advises_the_unsafe_unpickler(tmp_path):
    """torch's own message for a failed safe load says to retry with weights_only=False, which
    runs any code the file holds: advvit's messages keep torch's reason and drop that advice."""
    path, _, _ = _ckpt(tmp_path)
    whole = path.read_bytes()
    rng = np.random.default_rng(0)
    corrupt = {
        "random": [rng.bytes(4096) for _ in range(8)],
        # bytes that start like a pickle (protocol 2 and 4) or like torch's zip container
        "pickle-like": [b"\x80\x02" + rng.bytes(512), b"\x80\x04" + rng.bytes(512), b"PK\x03\x04" + rng.bytes(512)],
        "cut": [whole[:n] for n in (10, 100, len(whole) // 3, len(whole) - 1)],
        "flipped": [whole[:64] + bytes(b ^ 0xFF for b in whole[64:4096]) + whole[4096:]],
    }
    seen = 0
    for kind, blobs in corrupt.items():
        for i, blob in enumerate(blobs):
            bad = tmp_path / f"{kind}{i}.pth"
            bad.write_bytes(blob)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with pytest.raises(C.CheckpointError) as e:
                    C.load_checkpoint(bad)
            msg = str(e.value)
            assert "weights_only" not in msg, (kind, msg)
            assert str(bad) in msg and "\n" not in msg, (kind, msg)
            assert not [w for w in caught if "pickle protocol" in str(w.message)], kind
            seen += "truncated or corrupt" in msg
    assert seen >= 14  # all but a blob that happened to load as some other object


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(tmp_path)
    assert "is a folder" in str(e.value) and str(tmp_path / "best.pth") in str(e.value)


class _RunsCode:
    """A pickle that would run a shell command when unpickled with the full unpickler."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_named_as_such_not_as_corrupt(tmp_path):
    marker = tmp_path / "code-ran"
    saved = tmp_path / "torch_save.pth"
    torch.save({"model": _RunsCode(marker)}, saved)
    dumped = tmp_path / "pickle_dump.pth"  # protocol 4: torch's safe unpickler stops at its framing
    dumped.write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=4))
    for path in (saved, dumped):
        with pytest.raises(C.CheckpointError) as e:
            C.load_checkpoint(path)
        msg = str(e.value)
        assert msg.startswith(f"{path} holds objects other than plain data and tensors"), msg
        assert "system" in msg and "will not load" in msg and "full unpickler" in msg
        assert "truncated" not in msg and "corrupt" not in msg and "weights_only" not in msg
    assert not marker.exists()


def _flip_bytes_of(path, tensor):
    """Flip bytes inside one tensor's data in the file: torch reads it back without noticing."""
    blob = bytearray(path.read_bytes())
    at = blob.find(tensor.contiguous().numpy().tobytes())
    assert at >= 0
    for i in range(at + 4, at + 12):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))


def test_damaged_weights_fail_their_checksum(tmp_path):
    path, model, _ = _ckpt(tmp_path)
    ckpt = C.load_checkpoint(path)
    assert ckpt["checksums"]["algorithm"] == "crc32"
    assert list(ckpt["checksums"]["model"]) == list(ckpt["model"])
    key = max(ckpt["model"], key=lambda k: ckpt["model"][k].numel())
    _flip_bytes_of(path, ckpt["model"][key])
    assert torch.load(path, weights_only=True)["model"][key].shape  # torch itself takes it
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} (model): tensors fail their checksum: ['{key}']")
    assert "damaged" in msg and "best.pth" in msg and "\n" not in msg


def test_non_finite_weights_are_refused_with_or_without_checksums(tmp_path):
    model, spec, _ = _trained()
    with torch.no_grad():
        M.unwrap(model).fc.weight[0, :3] = float("nan")
        M.unwrap(model).fc.bias[1] = float("inf")
    state = C.make_checkpoint(model, spec, config={}, epoch=1, step=2)
    C.save_checkpoint(tmp_path / "new.pth", state)
    torch.save(state, tmp_path / "old.pth")  # as written before checksums were stored
    for name in ("new.pth", "old.pth"):
        with pytest.raises(C.CheckpointError) as e:
            C.load_checkpoint(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name} (model): 3 non-finite values (NaN or infinite) in "
                              "tensor fc.weight; 2 tensors, 4 values in all"), msg
        assert "another checkpoint" in msg and "best.pth" in msg
    good, _, _ = _trained()
    ema_bad = C.make_checkpoint(good, spec, config={}, epoch=1, step=2, ema=model)
    C.save_checkpoint(tmp_path / "ema.pth", ema_bad)
    with pytest.raises(C.CheckpointError, match=r"ema.pth \(ema\): 3 non-finite values"):
        C.load_checkpoint(tmp_path / "ema.pth")
    old_good = C.make_checkpoint(good, spec, config={}, epoch=1, step=2)
    torch.save(old_good, tmp_path / "old_good.pth")
    assert "checksums" not in C.load_checkpoint(tmp_path / "old_good.pth")  # loads, nothing to verify


# ---------------------------------------------------------------------------------------------
# weights that do not fit their spec
# ---------------------------------------------------------------------------------------------

def test_check_state_dict_fits_names_keys_and_shapes(tmp_path):
    path, model, _ = _ckpt(tmp_path)
    weights = dict(C.load_checkpoint(path)["model"])
    C.check_state_dict_fits(model, weights)  # fits: nothing raised
    key = "fc.weight"
    weights[key] = weights[key][:, :-1]
    weights["extra.bias"] = torch.zeros(3)
    del weights["fc.bias"]
    feat = model.model.fc.weight.shape[1]
    with pytest.raises(C.CheckpointError) as e:
        C.check_state_dict_fits(model, weights, where="last.pth (model)")
    msg = str(e.value)
    assert msg.startswith("last.pth (model): weights do not fit 'test_resnet'")
    assert f"fc.weight: checkpoint (10, {feat - 1}) vs model (10, {feat})" in msg
    assert "missing keys ['fc.bias']" in msg and "unexpected keys ['extra.bias']" in msg
    with pytest.raises(C.CheckpointError, match=r"fc.bias: checkpoint a list vs model \(10,\)"):
        C.check_state_dict_fits(model, dict(C.load_checkpoint(path)["model"], **{"fc.bias": [0.0] * 10}))
    headless = {k: v for k, v in C.load_checkpoint(path)["model"].items() if not k.startswith("fc.")}
    assert C.state_dict_misfit(model, headless, optional=["fc."]) == []
    assert C.state_dict_misfit(model, headless) == ["missing keys ['fc.weight', 'fc.bias']"]


# ---------------------------------------------------------------------------------------------
# atomic saves
# ---------------------------------------------------------------------------------------------

def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path, model, _ = _ckpt(tmp_path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        C.save_checkpoint(path, {"format": "anything"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temporary file left
    C.load_checkpoint(path)


@pytest.mark.slow
def test_kill_during_save_never_corrupts_the_checkpoint(tmp_path):
    """A process killed (SIGKILL) in the middle of writing: the old file is still there and loads."""
    path, _, _ = _ckpt(tmp_path)
    before = path.read_bytes()
    child = textwrap.dedent(f"""
        import sys, time
        import advvit
        import torch
        from advvit import checkpoint as C
        real_save = torch.save
        def slow_save(obj, f, *a, **kw):
            f.write(b"PK\\x03\\x04" + bytes(1 << 20))  # the first megabyte of a new checkpoint
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        C.torch.save = slow_save
        C.save_checkpoint({str(path)!r}, {{"big": torch.zeros(1 << 20)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "writing"
        tmp_files = [p for p in tmp_path.iterdir() if p.name != "last.pth"]
        assert tmp_files and all(p.name.startswith(".last.pth.") for p in tmp_files)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    C.create_model_from_checkpoint(path)


def test_save_replaces_atomically_and_creates_folders(tmp_path):
    path, _, _ = _ckpt(tmp_path / "deep" / "run")
    ckpt = C.load_checkpoint(path)
    ckpt["epoch"] = 4
    C.save_checkpoint(path, ckpt)
    assert C.load_checkpoint(path)["epoch"] == 4
    with pytest.raises(C.CheckpointError, match="is a folder"):
        C.save_checkpoint(tmp_path, ckpt)


# ---------------------------------------------------------------------------------------------
# export to plain timm
# ---------------------------------------------------------------------------------------------

def _run_without_advvit_models(code: str) -> str:
    # The guard in advvit._compat is needed on this machine's torchvision; advvit.models (which
    # registers the thesis variants) must stay unimported for a timm-native architecture.
    prelude = "import advvit._compat, sys\nimport timm, torch\n"
    epilogue = "\nassert 'advvit.models' not in sys.modules and 'advvit.checkpoint' not in sys.modules\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_export_loads_in_plain_timm_with_the_recorded_normalization(tmp_path):
    path, model, _ = _ckpt(tmp_path, arch="test_resnet", normalize=NORM)
    out = C.export_timm(path, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 10
    assert cfg["pretrained_cfg"]["mean"] == [0.286] and cfg["pretrained_cfg"]["std"] == [0.353]
    assert cfg["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert cfg["advvit"]["input_range"] == [0.0, 1.0] and cfg["advvit"]["train_norm"] == "linf"
    x = torch.rand(3, 1, 28, 28)
    torch.save({"x": x, "y": model.eval()(x).detach()}, tmp_path / "io.pt")
    _run_without_advvit_models(f"""
        from timm.data import resolve_data_config
        io = torch.load({str(tmp_path / 'io.pt')!r})
        a = timm.create_model("test_resnet", pretrained=True, num_classes=10, in_chans=1,
                              pretrained_cfg_overlay=dict(file={str(out / 'model.safetensors')!r},
                                                          num_classes=10, input_size=(1, 28, 28))).eval()
        b = timm.create_model("local-dir:{out}", pretrained=True).eval()
        cfg = resolve_data_config(model=b)
        mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
        xn = (io["x"] - mean) / std   # pixels in [0, 1], then the recorded normalization
        torch.testing.assert_close(a(xn), io["y"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b(xn), io["y"], rtol=1e-4, atol=1e-5)
    """)


@pytest.mark.slow
def test_export_of_an_unnormalized_xcit_says_identity(tmp_path):
    path, model, _ = _ckpt(tmp_path, arch="xcit_nano_12_p16_224", normalize=None, in_chans=3, img_size=32,
                           depth=1)
    out = C.export_timm(path, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained_cfg"]["mean"] == [0.0] * 3 and cfg["pretrained_cfg"]["std"] == [1.0] * 3
    assert cfg["model_args"]["img_size"] in (32, [32, 32]) and cfg["model_args"]["depth"] == 1
    assert "none" in cfg["advvit"]["normalization"]
    x = torch.rand(2, 3, 32, 32)
    torch.save({"x": x, "y": model.eval()(x).detach()}, tmp_path / "io.pt")
    _run_without_advvit_models(f"""
        io = torch.load({str(tmp_path / 'io.pt')!r})
        m = timm.create_model("local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(m(io["x"]), io["y"], rtol=1e-4, atol=1e-5)
    """)


def test_export_of_a_registered_variant_names_its_requirement(tmp_path):
    path, model, _ = _ckpt(tmp_path, arch="xcit_nano_12_p4_32", normalize=None, in_chans=1, img_size=28, depth=1)
    out = C.export_timm(path, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert "advvit.models" in cfg["advvit"]["requires"]
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(m(x), model.eval()(x))


# ---------------------------------------------------------------------------------------------
# the trainer refuses misfit weights before any work
# ---------------------------------------------------------------------------------------------

def _train_args(tmp_path, *extra):
    from test_data import make_idx_folder

    data = tmp_path / "fmnist"
    if not data.exists():
        make_idx_folder(data, n_train=16, n_test=8)
    return ["--dataset", "fashion_mnist", "--data-dir", str(data), "--model", "xcit_nano_12_p8_32",
            "--img-size", "32", "--batch-size", "8", "--output", str(tmp_path / "runs"), "--experiment", "run",
            "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--min-lr", "0",
            "--eps-warmup-epochs", "0", "--workers", "0",
            "--no-tensorboard", "--amp", "none", *extra]


@pytest.fixture
def no_training(monkeypatch):
    from advvit import engine

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(engine, "train_one_epoch", refuse)


def test_trainer_refuses_resume_of_weights_that_do_not_fit_their_spec(tmp_path, capsys, no_training):
    from advvit import train
    from advvit.config import config_to_dict, load_config

    args = _train_args(tmp_path)
    spec = C.ModelSpec("xcit_nano_12_p8_32", 10, 1, 32, None)
    model = M.create_model(spec.arch, num_classes=10, in_chans=1, img_size=32)
    state = C.make_checkpoint(model, spec, config=config_to_dict(load_config(args)), epoch=0, step=2)
    key = "blocks.3.mlp.fc1.weight"
    shape = tuple(state["model"][key].shape)
    state["model"][key] = state["model"][key][:, :-1].clone()  # the spec still fits, the weights do not
    last = tmp_path / "runs" / "run" / "last.pth"
    C.save_checkpoint(last, state)
    before = last.read_bytes()

    assert train.main(args + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {last} (model): weights do not fit 'xcit_nano_12_p8_32'")
    assert f"{key}: checkpoint {(shape[0], shape[1] - 1)} vs model {shape}" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert last.read_bytes() == before and not (last.parent / "args.yaml").exists()


def test_trainer_refuses_a_finetune_source_that_cannot_be_adapted(tmp_path, capsys, no_training):
    from advvit import train

    source, _, _ = _ckpt(tmp_path, name="resnet.pth", arch="resnet18_gelu", normalize=None)
    assert train.main(_train_args(tmp_path, "--finetune", str(source))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config key 'finetune': {source}: load_finetune_weights: the "
                          "checkpoint's weights cannot be adapted to the model")
    assert "missing keys ['cls_token'" in err and "unexpected keys ['conv1.weight'" in err
    assert "own architecture" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "run" / "args.yaml").exists()


def test_trainer_refuses_damaged_or_non_finite_weights_before_any_step(tmp_path, capsys, no_training):
    from advvit import train
    from advvit.config import config_to_dict, load_config

    args = _train_args(tmp_path)
    spec = C.ModelSpec("xcit_nano_12_p8_32", 10, 1, 32, None)
    model = M.create_model(spec.arch, num_classes=10, in_chans=1, img_size=32)
    with torch.no_grad():
        model.head.weight[0, :2] = float("nan")
    last = tmp_path / "runs" / "run" / "last.pth"
    C.save_checkpoint(last, C.make_checkpoint(model, spec, config=config_to_dict(load_config(args)),
                                              epoch=0, step=2))
    assert train.main(args + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {last} (model): 2 non-finite values (NaN or infinite) in tensor head.weight")
    assert "another checkpoint" in err and "last good" not in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (last.parent / "args.yaml").exists()

    assert train.main(_train_args(tmp_path, "--experiment", "ft", "--finetune", str(last))) == 2
    assert capsys.readouterr().err.startswith(f"error: config key 'finetune': --finetune: {last} "
                                              "(model): 2 non-finite values")

    with torch.no_grad():
        model.head.weight.zero_()
    C.save_checkpoint(last, C.make_checkpoint(model, spec, config=config_to_dict(load_config(args)),
                                              epoch=0, step=2))
    _flip_bytes_of(last, C.load_checkpoint(last)["model"]["pos_embed.token_projection.weight"])
    assert train.main(args + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {last} (model): tensors fail their checksum")
    assert "damaged" in err and "Traceback" not in err and err.count("\n") == 1
