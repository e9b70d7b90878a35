"""Model references (advvit.references): every source offline, from weights the tests write into
the folders timm, huggingface_hub and robustbench read; each source's normalization inside the
model exactly once; bad references refused with one message and exit 2 before any work."""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import advvit  # noqa: F401  (before timm)
import timm
from advvit import checkpoint as C
from advvit import eval as E
from advvit import train as T
from advvit.data import load_examples
from advvit.io import OptionError, sha256_file
from advvit.models import create_model
from advvit.references import ModelOptions, resolve_model
from advvit.wrappers import NormalizedModel, unwrap

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN_STD = ((0.2860,), (0.3530,))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hub and torch caches, offline: nothing is downloaded."""
    from huggingface_hub import constants
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return hub


def hub_snapshot(hub: Path, repo: str, files: dict[str, Path]) -> Path:
    """``files`` as a Hub cache holds a repository's main revision (blobs, snapshot, refs)."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        blob = folder / "blobs" / sha256_file(source)
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return folder


def normalizations(model: torch.nn.Module) -> int:
    """How many modules of the model normalize its input (advvit's and robustbench's)."""
    return sum(isinstance(m, NormalizedModel) or type(m).__name__ == "ImageNormalizer"
               for m in model.modules())


def _normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


# --------------------------------------------------------------------------- timm's loaders

def test_timm_name_is_normalized_once_by_its_pretrained_cfg(caches):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    plain = timm.create_model("test_vit.r160_in1k", pretrained=False).eval()
    weights = caches.parent / "w.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(weights))
    hub_snapshot(caches, "timm/test_vit.r160_in1k", {"model.safetensors": weights})
    loaded = resolve_model("timm:test_vit.r160_in1k")
    assert normalizations(loaded.model) == 1
    x = torch.rand(2, 3, 160, 160)
    cfg = plain.pretrained_cfg
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), plain(_normalized(x, cfg["mean"], cfg["std"])),
                              atol=1e-5)
    rec = loaded.record
    assert rec["sha256"] == sha256_file(weights) and rec["origin"] == "hf-hub:timm/test_vit.r160_in1k"
    assert (rec["input_range"], rec["img_size"], rec["num_classes"]) == ([0.0, 1.0], 160, 1000)
    assert rec["normalize"] == (tuple(cfg["mean"]), tuple(cfg["std"]))


@pytest.fixture
def ckpt(tmp_path) -> Path:
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST}")
    torch.manual_seed(0)
    model = create_model("test_vit", num_classes=10, in_chans=1, img_size=32, normalize=MEAN_STD)
    path = tmp_path / "model.pth"
    C.save_checkpoint(path, C.make_checkpoint(model, C.ModelSpec("test_vit", 10, 1, 32, MEAN_STD),
                                              config={"dataset": "fashion_mnist"}, epoch=1, step=1))
    return path


def _eval(reference: str, tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert E.main(["--checkpoint", reference, "--dataset", "fashion_mnist", "--data-dir",
                   str(FMNIST), "--n-examples", "16", "--batch-size", "8", "--device", "cpu",
                   "--attack", "fgsm", "--eps", "2/255", "--per-example", "--output", str(out),
                   *extra]) == 0
    return json.loads(out.read_text())


def test_an_export_through_local_dir_and_the_hub_cache_evaluates_as_its_checkpoint(ckpt, caches,
                                                                                  tmp_path):
    folder = C.export_timm(ckpt, tmp_path / "export")
    hub_snapshot(caches, "someone/robust-test-vit",
                 {n: folder / n for n in ("config.json", "model.safetensors")})
    reports = {name: _eval(ref, tmp_path, name) for name, ref in (
        ("checkpoint", str(ckpt)), ("local", f"local-dir:{folder}"),
        ("hub", "hf-hub:someone/robust-test-vit"))}
    base = reports["checkpoint"]
    for name in ("local", "hub"):
        assert reports[name]["per_example"] == base["per_example"], name
        assert reports[name]["model"]["normalize"] == [list(MEAN_STD[0]), list(MEAN_STD[1])]
        assert reports[name]["model"]["sha256"] == sha256_file(folder / "model.safetensors")
    assert reports["hub"]["model"]["origin"] == "hf-hub:someone/robust-test-vit"
    commit = "hf-hub:someone/robust-test-vit@0123456789abcdef0123456789abcdef01234567"
    for ref in (str(ckpt), f"local-dir:{folder}", "hf-hub:someone/robust-test-vit", commit):
        assert normalizations(resolve_model(ref).model) == 1, ref
    assert resolve_model(commit).record["sha256"] == sha256_file(folder / "model.safetensors")


def _train_py_checkpoint(path: Path, model: torch.nn.Module, arch: str = "test_vit",
                         **args) -> Path:
    """A checkpoint as timm's train.py (the thesis's public code) saves it, DDP prefixes kept."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "arch": arch, "state_dict": state, "state_dict_ema": state,
                "args": argparse.Namespace(model=arch, **args), "metric": 0.5}, path)
    return path


def test_a_timm_train_py_checkpoint_evaluates_as_the_same_advvit_checkpoint(ckpt, tmp_path):
    inner = unwrap(C.create_model_from_checkpoint(ckpt)[0])
    thesis = _train_py_checkpoint(tmp_path / "thesis.pth.tar", inner, num_classes=10,
                                  in_chans=1, input_size=[1, 32, 32], mean=list(MEAN_STD[0]),
                                  std=list(MEAN_STD[1]), dataset="fashion_mnist")
    loaded = resolve_model(str(thesis))
    assert normalizations(loaded.model) == 1
    assert loaded.record["normalization"] == "the checkpoint's args.mean/args.std"
    ours, theirs = _eval(str(ckpt), tmp_path, "ours"), _eval(str(thesis), tmp_path, "thesis")
    assert theirs["per_example"] == ours["per_example"]
    assert theirs["model"]["source"] == "timm-train-checkpoint"
    assert theirs["model"]["sha256"] == sha256_file(thesis)


def test_a_train_py_checkpoint_without_mean_takes_its_architectures_cfg(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32).eval()
    path = _train_py_checkpoint(tmp_path / "t.pth.tar", model, num_classes=10,
                                input_size=[3, 32, 32], mean=None, std=None)
    loaded = resolve_model(str(path))
    cfg = model.pretrained_cfg
    assert loaded.record["normalize"] == (tuple(cfg["mean"]), tuple(cfg["std"]))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model(_normalized(x, cfg["mean"], cfg["std"])),
                              atol=1e-5)


# --------------------------------------------------------------------------- robustbench

@pytest.fixture
def zoo(caches, tmp_path):
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed (scripts/setup.sh installs it)")
    from advvit.references import robustbench_zoo
    robustbench_zoo()  # imports robustbench, registering its timm models
    return tmp_path / "rb-models"


def _robustbench_weights(name: str, dataset: str, zoo_dir: Path) -> Path:
    """Random weights written where robustbench's load_model reads the entry's."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    torch.manual_seed(0)
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_linf"
    if timm.is_model(timm_name):
        model = timm.create_model(timm_name, pretrained=False)
        inner = model.model if isinstance(model, torch.nn.Sequential) else model
        url = timm.models.get_pretrained_cfg(timm_name).url
        file = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        state = inner.state_dict()
    else:
        model = model_dicts[BenchmarkDataset(dataset)][ThreatModel("Linf")][name]["model"]()
        file = zoo_dir / dataset / "Linf" / f"{name}.pt"
        state = model.state_dict()
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, file)
    return file


@pytest.mark.parametrize("dataset,name,size,inside", [
    ("cifar10", "Debenedetti2022Light_XCiT-S12", 32, 1),
    ("cifar10", "Standard", 32, 0),  # WideResNet-28-10, normalization-free
    ("imagenet", "Debenedetti2022Light_XCiT-S12", 224, 0),  # trained on raw [0, 1] pixels
])
def test_robustbench_entries_are_robustbenchs_own_models(zoo, dataset, name, size, inside):
    from robustbench.utils import load_model
    file = _robustbench_weights(name, dataset, zoo)
    loaded = resolve_model(f"robustbench:{dataset}/Linf/{name}",
                           ModelOptions(robustbench_dir=str(zoo)))
    theirs = load_model(name, model_dir=str(zoo), dataset=dataset, threat_model="Linf").eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), theirs(x))
    # robustbench's models normalize themselves (or were trained without): advvit adds nothing
    assert normalizations(loaded.model) == inside
    assert not any(isinstance(m, NormalizedModel) for m in loaded.model.modules())
    rec = loaded.record
    assert rec["zoo_entry"] == f"{dataset}/Linf/{name}" and rec["sha256"] == sha256_file(file)
    assert rec["img_size"] == size and rec["input_range"] == [0.0, 1.0]


def test_an_imagenet_entrys_examples_are_preprocessed_as_robustbench_does(zoo, tmp_path):
    from PIL import Image
    from robustbench.data import get_preprocessing
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from test_data import make_imagefolder
    name = "Debenedetti2022Light_XCiT-S12"
    _robustbench_weights(name, "imagenet", zoo)
    loaded = resolve_model(f"robustbench:imagenet/Linf/{name}",
                           ModelOptions(robustbench_dir=str(zoo)))
    folder = make_imagefolder(tmp_path / "images", per_class=1, size=300)
    ex = load_examples("imagefolder", folder, split="val", in_chans=3,
                       img_size=loaded.img_size, eval_transform=loaded.eval_transform)
    theirs = get_preprocessing(BenchmarkDataset.imagenet, ThreatModel.Linf, name, None)
    files = sorted(p for p in (folder / "val").rglob("*") if p.is_file())
    expected = torch.stack([theirs(Image.open(f).convert("RGB")) for f in files])
    assert ex.x.shape == (3, 3, 224, 224) and torch.equal(ex.x, expected)
    # advvit's own eval transform (bilinear, crop_pct 1) differs: the entry's is bicubic
    ours = load_examples("imagefolder", folder, split="val", in_chans=3, img_size=224)
    assert not torch.equal(ours.x, expected)
    assert "BICUBIC" in loaded.record["preprocessing"].upper()


def test_robustbench_name_takes_dataset_and_norm(zoo):
    file = _robustbench_weights("Debenedetti2022Light_XCiT-S12", "cifar10", zoo)
    loaded = resolve_model("robustbench:Debenedetti2022Light_XCiT-S12",
                           ModelOptions(dataset="cifar10", norm="linf", robustbench_dir=str(zoo)))
    assert loaded.record["zoo_entry"] == "cifar10/Linf/Debenedetti2022Light_XCiT-S12"
    assert loaded.record["sha256"] == sha256_file(file)
    assert loaded.trained_on == {"dataset": "cifar10"}


def test_the_eval_report_names_the_zoo_entry_and_its_sha256(zoo, tmp_path):
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST}")
    file = _robustbench_weights("Standard", "cifar10", zoo)
    # Fashion-MNIST's ten classes (as RGB) stand in for CIFAR-10's, which is not offline here.
    report = _eval("robustbench:cifar10/Linf/Standard", tmp_path, "rb", "--robustbench-dir",
                   str(zoo), "--n-examples", "4")
    model = report["model"]
    assert model["zoo_entry"] == "cifar10/Linf/Standard" and model["sha256"] == sha256_file(file)
    assert model["reference"] == "robustbench:cifar10/Linf/Standard"


# --------------------------------------------------------------------------- bad references

def _refused(reference: str, tmp_path: Path, capsys, *extra: str) -> str:
    out = tmp_path / "refused.json"
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--checkpoint", reference, "--dataset", "fashion_mnist", "--data-dir",
                str(FMNIST), "--device", "cpu", "--attack", "fgsm", "--output", str(out), *extra])
    assert exit_info.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    return err


@pytest.mark.parametrize("reference,expected", [
    ("foo:bar", "--checkpoint foo:bar: unknown scheme 'foo:': give a checkpoint path, timm:NAME"),
    ("timm:resnt18", "timm has no model 'resnt18' (close names: resnet18"),
    ("timm:resnet18.zzz", "no pretrained weights 'resnet18.zzz' (close names: resnet18."),
    ("hf-hub:someone", "give the Hub repository as ORG/NAME[@REVISION]"),
    ("nothing.pth", "--checkpoint nothing.pth does not exist: give a checkpoint path"),
])
def test_a_bad_reference_is_one_message_and_exit_2(caches, tmp_path, capsys, reference, expected):
    assert expected in _refused(reference, tmp_path, capsys)


def test_weights_absent_offline_name_the_file_and_folder(caches, tmp_path, capsys):
    err = _refused("timm:test_vit.r160_in1k", tmp_path, capsys)
    assert f"its weights are absent (offline): put them in {caches}/models--timm--test_vit.r160_in1k" in err
    err = _refused("hf-hub:someone/model", tmp_path, capsys)
    assert f"put config.json and model.safetensors under {caches}/models--someone--model" in err
    err = _refused(f"local-dir:{tmp_path}", tmp_path, capsys)
    assert f"no {tmp_path}/config.json: give a timm model folder" in err


def test_robustbench_misfits_are_refused(zoo, tmp_path, capsys):
    err = _refused("robustbench:cifar10/Linf/Standrd", tmp_path, capsys)
    assert "no cifar10/Linf zoo entry 'Standrd' (close names: Standard)" in err
    err = _refused("robustbench:cifar10/Linf/Standard", tmp_path, capsys, "--robustbench-dir",
                   str(zoo))
    assert f"its weights are absent (offline): put Standard.pt in {zoo}/cifar10/Linf" in err
    err = _refused("robustbench:Standard", tmp_path, capsys)  # --dataset fashion_mnist
    assert "--dataset fashion_mnist: the RobustBench zoo holds cifar10, cifar100" in err


def test_a_missing_robustbench_names_what_to_install(caches, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "robustbench", None)
    err = _refused("robustbench:cifar10/Linf/Standard", tmp_path, capsys)
    assert "robustbench:...: robustbench is not installed: pip install --no-deps " \
           "robustbench==1.1.1" in err


def test_a_class_count_misfit_is_refused(caches, tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=100, img_size=32).eval()
    path = _train_py_checkpoint(tmp_path / "c100.pth.tar", model, num_classes=100,
                                input_size=[3, 32, 32], mean=None, std=None)
    err = _refused(str(path), tmp_path, capsys)
    assert f"the model ({path}) has 100 classes but --dataset fashion_mnist has 10" in err


# --------------------------------------------------------------------------- export for the Hub

def test_the_export_folder_has_a_model_card_with_the_reports_results(ckpt, caches, tmp_path):
    from huggingface_hub import ModelCard

    from advvit import export as X
    (ckpt.parent / "args.yaml").write_text("model: test_vit\nepochs: 1\ntrain_eps: 0.0\n")
    report = _eval(str(ckpt), tmp_path, "aa")
    folder = tmp_path / "hub"
    assert X.main([str(ckpt), str(folder), "--report", str(tmp_path / "aa.json"),
                   "--name", "robust-test-vit"]) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm"
    assert {r.dataset_type for r in card.data.eval_results} == {"fashion_mnist"}
    metrics = {m["name"]: m["value"] for m in
               card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"clean accuracy": round(100 * report["clean_accuracy"], 2),
                       "robust accuracy (fgsm, linf eps 2/255)":
                           round(100 * report["robust_accuracy"]["value"], 2)}
    assert "epochs: 1" in card.text and "mean [0.286] and std [0.353]" in card.text
    hub_snapshot(caches, "someone/card", {n: folder / n for n in
                                          ("config.json", "model.safetensors", "README.md")})
    again = _eval("hf-hub:someone/card", tmp_path, "hub")
    assert again["per_example"] == report["per_example"]


def test_export_refuses_another_models_report(ckpt, tmp_path, capsys):
    from advvit import export as X
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"clean_accuracy": 0.5, "attack": {}, "model": {"sha256": "ab"}}))
    with pytest.raises(SystemExit) as exit_info:
        X.main([str(ckpt), str(tmp_path / "hub"), "--report", str(other)])
    assert exit_info.value.code == 2 and not (tmp_path / "hub").exists()
    assert "evaluated another model" in capsys.readouterr().err


# --------------------------------------------------------------------------- RobustBench's formats

def test_an_entry_from_a_standard_autoattack_run_reads_as_robustbenchs_leaderboard_reads_it(
        ckpt, zoo, tmp_path, monkeypatch, capsys):
    from robustbench.utils import list_available_models

    from advvit.leaderboard import model_info_entry, protocol_problems
    report = _eval(str(ckpt), tmp_path, "aa", "--attack", "autoattack", "--eps", "8/255",
                   "--n-examples", "8")
    # A tiny run on Fashion-MNIST is no protocol run: the entry is built from it all the same
    # to read it back, and its refusal says why.
    problems = protocol_problems(report)
    assert problems == ["--dataset fashion_mnist: RobustBench's leaderboards are CIFAR-10, "
                        "CIFAR-100 and ImageNet (imagefolder)"]
    entry, empty = model_info_entry({**report, "data": {**report["data"], "dataset": "cifar10"}})
    assert set(empty) == {"link", "name", "authors", "venue", "reported", "additional_data",
                          "footnote"}
    assert entry["eps"] == "8/255" and entry["architecture"] == "test_vit"
    folder = tmp_path / "rb" / "model_info" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    (folder / "Standard.json").write_text(json.dumps({**entry, "name": "advvit test"}))
    monkeypatch.chdir(tmp_path / "rb")
    capsys.readouterr()
    list_available_models("cifar10", "Linf")
    row = capsys.readouterr().out.splitlines()[-1]
    clean = 100 * report["clean_accuracy"]
    robust = 100 * report["robust_accuracy"]["value"]
    assert f"{clean:.2f}%" in row and f"{robust:.2f}%" in row and "test_vit" in row


def test_robustbench_protocol_runs_pass_and_others_are_refused_with_the_reason():
    from advvit.leaderboard import protocol_problems
    planned = {"data": {"dataset": "cifar10", "split": "test", "sample": "first",
                        "n_examples": 10_000}, "attack": {"name": "autoattack", "norm": "linf"},
               "eps": 8 / 255, "results": [8 / 255]}
    assert protocol_problems(planned) == []
    assert protocol_problems({**planned, "eps": 4 / 255}) == [
        "--eps 0.0156863: the cifar10 Linf leaderboard's is 8/255"]
    masked = {**planned, "warnings": [{"code": "zero-gradients", "message": "..."}]}
    assert "a sign of gradient masking" in protocol_problems(masked)[0]
    few = protocol_problems({**planned, "data": {**planned["data"], "n_examples": 500}})
    assert few == ["500 first examples of the test split: RobustBench's are the first 10000 "
                   "test images (--split test --n-examples 10000, no --sample random)"]


def test_a_non_protocol_entry_is_refused_before_any_work(ckpt, tmp_path, capsys):
    entry = tmp_path / "entry.json"
    err = _refused(str(ckpt), tmp_path, capsys, "--robustbench-entry", str(entry),
                   "--attack", "apgd-ce", "--n-examples", "4")
    assert "--robustbench-entry: refused, the run is not RobustBench's protocol: --dataset " \
           "fashion_mnist" in err
    assert not entry.exists()


def test_save_adv_in_robustbenchs_format_is_the_examples_in_test_set_order(ckpt, tmp_path):
    plain, bare = tmp_path / "adv.pt", tmp_path / "rb.pt"
    _eval(str(ckpt), tmp_path, "a", "--sample", "random", "--save-adv", str(plain))
    _eval(str(ckpt), tmp_path, "b", "--sample", "random", "--save-adv", str(bare),
          "--save-adv-format", "robustbench")
    ours, theirs = torch.load(plain), torch.load(bare)
    order = sorted(range(len(ours["indices"])), key=lambda k: ours["indices"][k])
    assert isinstance(theirs, torch.Tensor) and theirs.shape == (16, 1, 32, 32)
    assert torch.equal(theirs, ours["x_adv"][order])


def test_analyze_takes_references_for_every_model_option(ckpt, caches, tmp_path):
    from advvit import analyze as A
    folder = C.export_timm(ckpt, tmp_path / "export")
    inner = unwrap(C.create_model_from_checkpoint(ckpt)[0])
    thesis = _train_py_checkpoint(tmp_path / "thesis.pth.tar", inner, num_classes=10,
                                  in_chans=1, input_size=[1, 32, 32], mean=list(MEAN_STD[0]),
                                  std=list(MEAN_STD[1]))
    out = tmp_path / "semantic"
    assert A.main(["semantic", "--checkpoint", str(ckpt), "--checkpoint", f"local-dir:{folder}",
                   "--judge", str(thesis), "--dataset", "fashion_mnist", "--data-dir", str(FMNIST),
                   "--device", "cpu", "--batch-size", "8", "--n-examples", "4", "--steps", "2",
                   "--output", str(out)]) == 0
    report = json.loads((out / "semantic.json").read_text())
    assert [m["source"] for m in report["models"]] == ["checkpoint", "local-dir"]
    assert report["judges"][0]["source"] == "timm-train-checkpoint"
    for record in [*report["models"], *report["judges"]]:
        assert record["normalize"] == [list(MEAN_STD[0]), list(MEAN_STD[1])]
        assert record["input_range"] == [0.0, 1.0] and record["sha256"]


def test_a_state_dict_with_model_reads_the_image_folder_it_is_given(tmp_path, capsys):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=2, img_size=32)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    for c in ("cat", "dog"):
        (tmp_path / "images" / "train" / c).mkdir(parents=True)
    loaded = resolve_model(str(weights), ModelOptions(model="test_vit", dataset="imagefolder",
                                                      data_dir=str(tmp_path / "images"),
                                                      img_size=32))
    assert loaded.num_classes == 2 and loaded.record["sha256"] == sha256_file(weights)
    err = _refused(str(weights), tmp_path, capsys, "--model", "test_vit", "--dataset",
                   "imagefolder", "--data-dir", str(tmp_path / "nothing"))
    assert "--dataset imagefolder: " in err


# --------------------------------------------------------------------------- fine-tuning

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _train_argv(tmp_path: Path, finetune: str, *extra: str) -> list:
    """A two-step run of test_vit on a tiny Fashion-MNIST (grey images repeated to 3 channels)."""
    from test_data import make_idx_folder
    data = tmp_path / "fmnist"
    if not data.exists():
        make_idx_folder(data, n_train=8, n_test=4)
    return ["--dataset", "fashion_mnist", "--data-dir", str(data), "--model", "test_vit",
            "--img-size", "32", "--in-chans", "3", "--batch-size", "4", "--workers", "0",
            "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--min-lr", "0",
            "--eps-warmup-epochs", "0", "--eval-batches", "1", "--no-tensorboard", "--amp",
            "none", "--device", "cpu", "--output", str(tmp_path / "runs"), "--experiment", "run",
            "--finetune", finetune, *extra]


def _source(num_classes: int = 100) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=num_classes, img_size=32).eval()


def test_finetune_from_a_thesis_checkpoint_takes_its_normalization_once(tmp_path):
    from advvit import trainer
    from advvit.config import load_config
    source = _source()
    thesis = _train_py_checkpoint(tmp_path / "thesis.pth.tar", source, num_classes=100,
                                  input_size=[3, 32, 32], mean=list(IMAGENET[0]),
                                  std=list(IMAGENET[1]))
    argv = _train_argv(tmp_path, str(thesis))
    parts = trainer.build(load_config(argv))  # the model before any step
    try:
        assert parts.spec.normalize == IMAGENET and normalizations(parts.model) == 1
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():  # the same features from [0, 1] pixels: only the head is new
            assert torch.allclose(parts.model.eval().forward_features(x),
                                  source.forward_features(_normalized(x, *IMAGENET)), atol=1e-5)
    finally:
        parts.lock.release()
    shutil.rmtree(tmp_path / "runs")

    assert T.main(argv + ["--max-steps-per-epoch", "2"]) == 0
    run = tmp_path / "runs" / "run"
    last = C.load_checkpoint(run / "last.pth")
    assert last["step"] == 2 and last["spec"]["normalize"] == [list(IMAGENET[0]), list(IMAGENET[1])]
    note = (run / "args.yaml").read_text().splitlines()[0]
    assert note.startswith(f"# finetune {thesis}: timm-train-checkpoint test_vit, sha256 "
                           f"{sha256_file(thesis)}, normalization mean [0.485")
    assert "re-initialised: ['head.weight', 'head.bias']" in note


def test_finetune_from_a_local_dir_timm_folder(caches, tmp_path):
    model = create_model("test_vit", num_classes=10, in_chans=3, img_size=32, normalize=IMAGENET)
    path = tmp_path / "model.pth"
    C.save_checkpoint(path, C.make_checkpoint(model, C.ModelSpec("test_vit", 10, 3, 32, IMAGENET),
                                              config={}, epoch=1, step=1))
    folder = C.export_timm(path, tmp_path / "export")
    assert T.main(_train_argv(tmp_path, f"local-dir:{folder}", "--max-steps-per-epoch", "1")) == 0
    run = tmp_path / "runs" / "run"
    assert C.load_checkpoint(run / "last.pth")["spec"]["normalize"] == \
        [list(IMAGENET[0]), list(IMAGENET[1])]
    assert f"# finetune local-dir:{folder}: local-dir test_vit, sha256 " \
           f"{sha256_file(folder / 'model.safetensors')}" in (run / "args.yaml").read_text()


def _train_refused(argv: list, tmp_path: Path, capsys) -> str:
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "runs").exists()  # nothing written, not even the run folder
    return err


@pytest.mark.parametrize("reference,expected", [
    ("foo:bar", "config key 'finetune': --finetune foo:bar: unknown scheme 'foo:'"),
    ("timm:resnt18", "--finetune timm:resnt18: timm has no model 'resnt18' (close names: resnet18"),
    ("nothing.pth", "--finetune nothing.pth does not exist: give a checkpoint path"),
])
def test_a_bad_finetune_reference_is_one_message_and_exit_2(caches, tmp_path, capsys, reference,
                                                            expected):
    assert expected in _train_refused(_train_argv(tmp_path, reference), tmp_path, capsys)


def test_a_finetune_source_that_does_not_fit_is_refused_before_any_work(caches, tmp_path, capsys):
    from safetensors.torch import save_file
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _source().state_dict().items()}, str(weights))
    err = _train_refused(_train_argv(tmp_path, str(weights)), tmp_path, capsys)
    assert "holds weights without their model or normalization" in err
    resnet = timm.create_model("resnet18", num_classes=10)
    other = _train_py_checkpoint(tmp_path / "resnet.pth.tar", resnet, "resnet18", num_classes=10)
    err = _train_refused(_train_argv(tmp_path, str(other)), tmp_path, capsys)
    assert f"config key 'finetune': {other}: load_finetune_weights: the checkpoint's weights " \
           "cannot be adapted" in err
    thesis = _train_py_checkpoint(tmp_path / "thesis.pth.tar", _source(), num_classes=100,
                                  input_size=[3, 32, 32], mean=list(IMAGENET[0]),
                                  std=list(IMAGENET[1]))
    err = _train_refused(_train_argv(tmp_path, str(thesis), "--normalize", "dataset"), tmp_path,
                         capsys)
    assert "config key 'normalize': dataset is mean [0.286" in err
    assert f"the finetune source {thesis} was trained behind mean [0.485" in err
    assert "(set normalize: none, which takes the source's normalization)" in err


# --------------------------------------------------------------------------- input size

def test_a_model_that_cannot_take_the_examples_size_is_refused(tmp_path, capsys):
    from advvit import analyze as A
    from test_data import make_idx_folder
    data = tmp_path / "fmnist"
    make_idx_folder(data, n_train=4, n_test=4)
    torch.manual_seed(0)
    # No recorded size: the model is built at its architecture's 160, the examples come at 28.
    model = create_model("test_vit", num_classes=10, in_chans=1)
    path = tmp_path / "sizeless.pth"
    C.save_checkpoint(path, C.make_checkpoint(model, C.ModelSpec("test_vit", 10, 1, None, None),
                                              config={}, epoch=1, step=1))
    common = ["--checkpoint", str(path), "--dataset", "fashion_mnist", "--data-dir", str(data),
              "--device", "cpu", "--batch-size", "4", "--n-examples", "4"]
    expected = f"the model ({path}) takes 160x160 inputs (the token grid it was built for) but " \
               "the examples come at 28x28: give a model that records the size it takes"
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_info:
        E.main([*common, "--attack", "fgsm", "--output", str(out)])
    assert exit_info.value.code == 2 and not out.exists()
    assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        A.main(["perturbations", *common, "--output", str(tmp_path / "analysis")])
    assert exit_info.value.code == 2
    assert "takes 160x160 inputs (the token grid it was built for) but the examples come at " \
           "28x28" in capsys.readouterr().err
    # XCiT computes its positions from the grid: any multiple of its patch, not 28 for 8x8.
    from advvit.io import OptionError as Refused
    from advvit.references import check_input_size
    xcit = create_model("xcit_nano_12_p8_32", num_classes=10, img_size=32)
    check_input_size(xcit, (64, 64), "xcit")
    with pytest.raises(Refused, match="cuts its input into 8x8 patches but the examples come at 28x28"):
        check_input_size(xcit, (28, 28), "xcit")
    check_input_size(timm.create_model("resnet18", num_classes=10), (28, 28), "resnet")
