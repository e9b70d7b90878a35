"""Do two source trees give the same outputs? Every command once, then a file-by-file comparison.

    python scripts/check_outputs_identical.py build CKPTS
    cd TREE && PYTHONPATH=TREE python scripts/check_outputs_identical.py run --tree TREE \\
        --ckpts CKPTS --checkpoint /abs/path/quickstart/best.pth OUT
    python scripts/check_outputs_identical.py compare BEFORE AFTER

``run`` goes in TREE's own folder: its commands are ``python -m advvit...``, which puts the
current folder first on the path, before PYTHONPATH, so run from another checkout they would
measure that checkout's code.

``build`` writes a 16x16 idx data set (Fashion-MNIST's file format, ten classes of bars) and two
tiny ViT checkpoints trained a few seeded steps on it, once, so that both trees read the same
files. ``run`` runs, with TREE first on PYTHONPATH, the quickstart evaluation on ``--checkpoint``,
evaluations on the tiny checkpoints (a resumable AutoAttack run with its state file, APGD-CE at
its default restarts, a PGD eps sweep with corruptions and adversarial examples), every
``advvit.analyze`` sub-command, and ``advvit.findings report`` on the shipped records; every
file goes under OUT (``run.json`` names the tree, the folder and each command's exit status and
output). ``compare`` reads two such folders: JSON reports and state files must be equal once
the keys in IGNORED_KEYS are dropped (wherever they are) and the folder and tree paths in
strings are read as placeholders; saved tensors must be equal; each other file must have the
same bytes, except PNG figures, whose pixel sizes the JSON reports already hold (Agg's output
depends on the font cache). Each command's exit status and console output must match too, with
times and paths read the same way, progress lines (their count depends on the machine's speed)
and argparse's usage synopsis (it names each option by its first name) left out. Exit status
1 on any difference.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

IGNORED_KEYS = frozenset({"created", "seconds", "seconds_total"})
"""Wall-clock fields: the report's creation time (``created``), and durations (``seconds`` of
an attack, a corruption run, an analysis or its parts; ``seconds_total`` of an evaluation)."""
SIZE = 16
MEAN_STD = ((0.3,), (0.4,))
FINDINGS = ("01_cait", "05_semantic", "11_transfer")
"""Shipped records whose measurements ``findings report`` judges anew (no runs are present)."""


# ------------------------------------------------------------------------------------ build

def _write_idx(path: Path, array: Any) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                        *array.shape)
    path.write_bytes(gzip.compress(header + array.astype("uint8").tobytes(), mtime=0))


def _patterns(n: int, seed: int) -> tuple[Any, Any]:
    import numpy as np
    g = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = np.zeros((n, SIZE, SIZE), dtype=np.float32)
    for i, c in enumerate(y):
        if c < 5:
            x[i, 2 + 3 * c: 4 + 3 * c, 2:14] = 1.0
        else:
            x[i, 2:14, 2 + 3 * (c - 5): 4 + 3 * (c - 5)] = 1.0
    x = np.clip(x * g.uniform(0.6, 1.0, (n, 1, 1)) + g.normal(0, 0.05, x.shape) * (x > 0), 0, 1)
    return (x * 255).round().astype(np.uint8), y.astype(np.uint8)


def build(folder: Path) -> None:
    import torch
    import torch.nn.functional as F
    import advvit  # noqa: F401  (before timm)
    from advvit import checkpoint as C
    from advvit import data as D
    from advvit.models import create_model
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 400, 0), ("t10k", 60, 1)):
        images, labels = _patterns(n, seed)
        _write_idx(data_dir / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(data_dir / f"{split}-labels-idx1-ubyte.gz", labels)
    torch.set_num_threads(1)
    for name, seed, steps in (("a", 0, 24), ("b", 1, 8)):
        torch.manual_seed(seed)
        train = D.create_dataset("fashion_mnist", data_dir, split="train")
        loader = D.create_loader(train, img_size=SIZE, in_chans=1, batch_size=50,
                                 is_training=False)
        model = create_model("test_vit", num_classes=10, in_chans=1, img_size=SIZE,
                             normalize=MEAN_STD, patch_size=4)
        opt = torch.optim.AdamW(model.parameters(), 3e-3)
        model.train()
        done = 0
        while done < steps:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        spec = C.ModelSpec("test_vit", 10, 1, SIZE, MEAN_STD, {"patch_size": 4})
        (folder / name).mkdir(exist_ok=True)
        C.save_checkpoint(folder / name / "best.pth", C.make_checkpoint(
            model, spec, config={"dataset": "fashion_mnist", "data_dir": str(data_dir)},
            epoch=1, step=steps, train_norm="linf", train_eps=8 / 255))
    print(f"data and checkpoints a/best.pth, b/best.pth in {folder}")


# -------------------------------------------------------------------------------------- run

def _commands(ckpts: Path, quickstart: str, n_examples: int, out: Path) -> list[tuple[str, list[str]]]:
    a, b = str(ckpts / "a" / "best.pth"), str(ckpts / "b" / "best.pth")
    data = ["--dataset", "fashion_mnist", "--data-dir", str(ckpts / "data"), "--device", "cpu"]
    cache = str(out / "corruption-cache")
    ev = out / "eval"
    an = out / "analyze"

    def analyze(name: str, *extra: str, folder: str | None = None) -> tuple[str, list[str]]:
        folder = folder or name
        return f"analyze-{folder}", ["-m", "advvit.analyze", name, "--checkpoint", a,
                                     "--checkpoint", b, *data, "--batch-size", "8", "--output",
                                     str(an / folder), *extra]

    return [
        ("eval-quickstart", ["-m", "advvit.eval", "--checkpoint", quickstart, "--dataset",
                             "fashion_mnist", "--attack", "apgd-ce", "--restarts", "1", "--eps",
                             "0.1", "--n-examples", str(n_examples), "--batch-size", "250",
                             "--output", str(ev / "quickstart.json")]),
        ("eval-autoattack-state", ["-m", "advvit.eval", "--checkpoint", a, *data, "--attack",
                                   "autoattack", "--eps", "8/255", "--n-examples", "20",
                                   "--batch-size", "10", "--state-path",
                                   str(ev / "autoattack.state"), "--output",
                                   str(ev / "autoattack.json")]),
        ("eval-autoattack-resumed", ["-m", "advvit.eval", "--checkpoint", a, *data, "--attack",
                                     "autoattack", "--eps", "8/255", "--n-examples", "20",
                                     "--batch-size", "10", "--state-path",
                                     str(ev / "autoattack.state"), "--output",
                                     str(ev / "autoattack-resumed.json")]),
        ("eval-apgd-ce-default-restarts", ["-m", "advvit.eval", "--checkpoint", b, *data,
                                           "--attack", "apgd-ce", "--steps", "5", "--eps",
                                           "8/255", "--n-examples", "12", "--per-example",
                                           "--output", str(ev / "apgd-ce.json")]),
        ("eval-pgd-sweep-corruptions", ["-m", "advvit.eval", "--checkpoint", a, *data,
                                        "--attack", "pgd", "--steps", "3", "--eps-sweep",
                                        "0,4/255,8/255", "--n-examples", "16", "--sample",
                                        "random", "--seed", "3", "--batch-size", "8",
                                        "--corruptions", "gaussian_noise,fog",
                                        "--corruption-severities", "1,3",
                                        "--corruption-cache-dir", cache,
                                        "--corruption-workers", "0", "--save-adv",
                                        str(ev / "pgd-adv.pt"), "--output",
                                        str(ev / "pgd-sweep.json")]),
        ("eval-bad-option", ["-m", "advvit.eval", "--checkpoint", a, *data, "--attack",
                             "apgd-ce", "--restarts", "0"]),
        analyze("perturbations", "--n-examples", "5", "--steps", "3", "--show", "4"),
        analyze("class-viz", "--steps", "3", "--classes", "0,Trouser,9"),
        analyze("semantic", "--n-examples", "12", "--steps", "3"),
        analyze("transfer", "--n-examples", "12", "--steps", "3"),
        analyze("transfer", "--n-examples", "8", "--steps", "3", "--attack", "apgd-ce",
                folder="transfer-apgd-ce"),
        analyze("jacobian", "--n-examples", "3", "--steps", "5"),
        analyze("propagation", "--n-examples", "4", "--steps", "2"),
        analyze("similarity", "--n-examples", "6"),
        analyze("lesions", "--n-examples", "6", "--steps", "2", "--kinds", "attn,block"),
        analyze("corruptions", "--n-examples", "8", "--corruptions", "gaussian_noise,fog",
                "--severities", "1,3", "--baseline", b, "--cache-dir", cache,
                "--corruption-workers", "0"),
        analyze("spatial", "--n-examples", "6", "--max-rotation", "10", "--rotation-steps", "3",
                "--max-translation", "0.1", "--translation-steps", "3"),
        ("analyze-bad-option", ["-m", "advvit.analyze", "spatial", "--checkpoint", a, *data,
                                "--rotation-steps", "0", "--output", str(an / "bad")]),
        ("findings-report", ["-m", "advvit.findings", "report", *FINDINGS]),
    ]


def run(tree: Path, ckpts: Path, quickstart: str, n_examples: int, out: Path,
        only: list[str] | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    findings = out / "findings"
    (findings / "docs" / "findings").mkdir(parents=True, exist_ok=True)
    # The experiment files name their training configs relative to the repository root.
    shutil.copytree(tree / "configs", findings / "configs", dirs_exist_ok=True)
    for name in FINDINGS:
        shutil.copy(tree / "docs" / "findings" / f"{name}.json", findings / "docs" / "findings")
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    # A run of some commands adds to the folder's record (the quickstart's checkpoint may come
    # later than the tiny ones).
    previous = out / "run.json"
    commands = json.loads(previous.read_text())["commands"] if previous.exists() else {}
    record: dict[str, Any] = {"tree": str(tree.resolve()), "out": str(out.resolve()),
                              "commands": commands}
    for name, words in _commands(ckpts, quickstart, n_examples, out):
        if only and name not in only:
            continue
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *words], env=env, capture_output=True, text=True,
                              cwd=findings if name.startswith("findings") else None)
        seconds = time.perf_counter() - started
        commands[name] = {"argv": words, "rc": done.returncode,
                                    "stdout": done.stdout, "stderr": done.stderr}
        print(f"{name}: exit {done.returncode}, {seconds:.0f} s", flush=True)
        if done.returncode not in (0, 2):
            print(done.stderr[-2000:], file=sys.stderr)
        (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------- compare

_TIMES = re.compile(r"(?<=%[ !])\s+\d+\.\d$|\d+(\.\d+)? s\b|\d+(\.\d+)? images/s|\d+(\.\d+)?s/it|"
                    r"\d{4}-\d\d-\d\dT[\d:]+(\+00:00)?|\btook [\d.]+|\d+(\.\d+)? ?(seconds|min)")


def _normalise(value: Any, paths: list[tuple[str, str]]) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, paths) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_normalise(v, paths) for v in value]
    if isinstance(value, str):
        for path, placeholder in paths:
            value = value.replace(path, placeholder)
    return value


def _without_usage(lines: list[str]) -> list[str]:
    """argparse's synopsis before an error line lists each option by its first name, which the
    shared option groups may change (the error line itself is kept)."""
    out, in_usage = [], False
    for line in lines:
        in_usage = (in_usage or line.startswith("usage:")) and ": error:" not in line
        if not in_usage:
            out.append(line)
    return out


def _console(text: str, paths: list[tuple[str, str]]) -> list[str]:
    """A command's console output with times (the evaluation table's seconds column too),
    paths, progress lines and usage synopses read as :func:`compare` says."""
    text = _normalise(text, paths)
    lines = _without_usage([_TIMES.sub("<time>", line) for line in text.splitlines()])
    # Progress lines come at most every 2 s: how many appear depends on the machine's speed.
    return [line for line in lines if "images/s" not in line and "<time>/it" not in line]


def _paths(folder: Path) -> list[tuple[str, str]]:
    record = json.loads((folder / "run.json").read_text())
    return [(record["out"], "<out>"), (str(folder), "<out>"), (record["tree"], "<tree>")]


def _same_tensors(a: Any, b: Any) -> bool:
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def _verdict(rel: str, a: Path, b: Path, pa: list, pb: list) -> str:
    if rel.endswith(".json") or rel.endswith(".state"):
        ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
        return "identical" if _normalise(ja, pa) == _normalise(jb, pb) else "DIFFERS"
    if rel.endswith(".pt"):
        import torch
        same = _same_tensors(torch.load(a, weights_only=True), torch.load(b, weights_only=True))
        return "identical" if same else "DIFFERS"
    if rel.endswith(".png"):
        return "present (pixels not compared)"
    if rel.endswith(".md"):
        ta = _normalise(a.read_text(), pa)
        tb = _normalise(b.read_text(), pb)
        return "identical" if ta == tb else "DIFFERS"
    return "identical" if a.read_bytes() == b.read_bytes() else "DIFFERS"


def compare(before: Path, after: Path) -> int:
    pa, pb = _paths(before), _paths(after)
    skip = {"run.json"}
    files_a = {str(p.relative_to(before)) for p in before.rglob("*") if p.is_file()
               and "corruption-cache" not in p.parts and ".lock" not in p.name} - skip
    files_b = {str(p.relative_to(after)) for p in after.rglob("*") if p.is_file()
               and "corruption-cache" not in p.parts and ".lock" not in p.name} - skip
    bad = 0
    for rel in sorted(files_a | files_b):
        if rel not in files_b or rel not in files_a:
            verdict = f"only in {'before' if rel in files_a else 'after'}"
        else:
            verdict = _verdict(rel, before / rel, after / rel, pa, pb)
        bad += verdict in ("DIFFERS",) or verdict.startswith("only")
        print(f"{verdict:32s} {rel}")
    ra = json.loads((before / "run.json").read_text())["commands"]
    rb = json.loads((after / "run.json").read_text())["commands"]
    for name in sorted(set(ra) | set(rb)):
        if name not in ra or name not in rb:
            verdict = f"only in {'before' if name in ra else 'after'}"
        elif ra[name]["rc"] != rb[name]["rc"]:
            verdict = f"DIFFERS (exit {ra[name]['rc']} vs {rb[name]['rc']})"
        elif any(_console(ra[name][k], pa) != _console(rb[name][k], pb)
                 for k in ("stdout", "stderr")):
            verdict = "DIFFERS (console output)"
            for k in ("stdout", "stderr"):
                la, lb = _console(ra[name][k], pa), _console(rb[name][k], pb)
                for x, y in zip(la + [""] * len(lb), lb + [""] * len(la)):
                    if x != y:
                        print(f"  {k}: before {x!r}\n  {k}: after  {y!r}")
                        break
        else:
            verdict = f"identical (exit {ra[name]['rc']}, console)"
        bad += verdict.startswith(("DIFFERS", "only"))
        print(f"{verdict:32s} command {name}")
    print(f"{'all identical' if not bad else f'{bad} differences'}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="data and two tiny checkpoints")
    b.add_argument("folder", type=Path)
    r = sub.add_parser("run", help="every command with --tree on PYTHONPATH")
    r.add_argument("out", type=Path)
    r.add_argument("--tree", type=Path, required=True)
    r.add_argument("--ckpts", type=Path, required=True, help="the folder `build` wrote")
    r.add_argument("--checkpoint", required=True, help="the quickstart's best.pth")
    r.add_argument("--n-examples", type=int, default=250,
                   help="examples of the quickstart evaluation")
    r.add_argument("--only", nargs="+", metavar="NAME", help="run these commands only")
    c = sub.add_parser("compare", help="two `run` folders")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = p.parse_args(argv)
    if args.action == "build":
        build(args.folder)
        return 0
    if args.action == "run":
        return run(args.tree.resolve(), args.ckpts.resolve(), args.checkpoint, args.n_examples,
                   args.out.resolve(), args.only)
    return compare(args.before.resolve(), args.after.resolve())


if __name__ == "__main__":
    sys.exit(main())
