"""RobustBench's formats for an evaluation's results: the ``model_info`` entry of its leaderboard
and the adversarial examples of its external evaluations.

An entry is written only for a run of RobustBench's protocol (:func:`protocol_problems` says why
not): standard AutoAttack at the leaderboard's eps, on its examples (the first 10,000 CIFAR test
images; the 5,000 ImageNet images of its ``imagenet_test_image_ids.txt``), with no sanity-check
warning (a gradient-masking sign makes the number meaningless). The fields only a person knows
(the paper's link, name, authors, venue, the reported accuracy, extra data) are left empty and
listed by :func:`model_info_entry`.

External evaluations hand in the adversarial images "as a ``.pt`` tensor of the same size of the
corresponding test set": :func:`save_adversarial` writes ``x_adv`` alone, ``[N, C, H, W]`` in
[0, 1], in the test set's order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from .data import read_ids_file
from .io import atomic_write

__all__ = ["LEADERBOARD_EPS", "THREATS", "protocol_problems", "model_info_entry", "PERSON_FIELDS",
           "save_adversarial", "robustbench_dataset"]

# (RobustBench data set, threat model) -> its eps, in [0, 1] pixel units, and as it writes it.
LEADERBOARD_EPS = {("cifar10", "Linf"): (8 / 255, "8/255"), ("cifar100", "Linf"): (8 / 255, "8/255"),
                   ("cifar10", "L2"): (0.5, "0.5"), ("imagenet", "Linf"): (4 / 255, "4/255")}
THREATS = {"linf": "Linf", "l2": "L2"}
"""advvit's attack norms -> RobustBench's threat models."""
_EXAMPLES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
PERSON_FIELDS = ("link", "name", "authors", "venue", "reported", "additional_data", "footnote")
"""The entry's fields only a person knows: left empty, listed on the console."""


def robustbench_dataset(dataset: str) -> Optional[str]:
    """RobustBench's name of an advvit data set (its ImageNet is an image folder here)."""
    return {"cifar10": "cifar10", "cifar100": "cifar100", "imagefolder": "imagenet"}.get(dataset)


def _accuracy(value: Any) -> float:
    return float(value["value"] if isinstance(value, Mapping) else value)


def protocol_problems(report: Mapping[str, Any], *, imagenet_ids: Optional[Path] = None
                      ) -> list[str]:
    """Why an evaluation report is not a run of RobustBench's protocol ([] when it is).

    Args:
        report: an ``advvit.eval`` report.
        imagenet_ids: RobustBench's ``imagenet_test_image_ids.txt`` (ImageNet runs; robustbench's
            own copy when None and robustbench is installed).
    """
    data, attack = report.get("data") or {}, report["attack"]
    dataset = robustbench_dataset(str(data.get("dataset")))
    if dataset is None:
        return [f"--dataset {data.get('dataset')}: RobustBench's leaderboards are CIFAR-10, "
                "CIFAR-100 and ImageNet (imagefolder)"]
    threat = THREATS[attack["norm"]]
    problems = []
    if attack["name"] != "autoattack":
        problems.append(f"--attack {attack['name']}: RobustBench's leaderboards take standard "
                        "AutoAttack (--attack autoattack)")
    if len(report.get("results") or []) != 1:
        problems.append("--eps-sweep: an entry is one eps; evaluate at the leaderboard's alone")
    if (dataset, threat) not in LEADERBOARD_EPS:
        problems.append(f"RobustBench has no {dataset} {threat} leaderboard")
    else:
        eps, text = LEADERBOARD_EPS[(dataset, threat)]
        if abs(float(report["eps"]) - eps) > 1e-9:
            problems.append(f"--eps {report['eps']:.6g}: the {dataset} {threat} leaderboard's is "
                            f"{text}")
    n = int(data.get("n_examples") or 0)
    if dataset == "imagenet":
        expected = _robustbench_ids(imagenet_ids)
        given = read_ids_file(data["ids_file"]) if data.get("ids_file") else None
        if expected is None:
            problems.append("the ImageNet examples cannot be compared with RobustBench's ids: "
                            "install robustbench (scripts/setup.sh)")
        elif given != expected:
            problems.append(f"--ids-file {data.get('ids_file')}: RobustBench's ImageNet "
                            f"examples are the {len(expected)} of its imagenet_test_image_ids.txt")
    elif data.get("split") not in ("val", "test") or data.get("sample") != "first" \
            or n != _EXAMPLES[dataset]:
        problems.append(f"{n} {data.get('sample')} examples of the {data.get('split')} split: "
                        f"RobustBench's are the first {_EXAMPLES[dataset]} test images "
                        "(--split test --n-examples 10000, no --sample random)")
    flags = report.get("warnings") or []
    if flags:
        problems.append(f"the run raised {len(flags)} sanity-check warning(s) "
                        f"({', '.join(str(f.get('code', f)) for f in flags[:3])}): a sign of "
                        "gradient masking, which RobustBench does not list")
    return problems


def _robustbench_ids(path: Optional[Path]) -> Optional[list[str]]:
    if path is None:
        import importlib.util
        spec = importlib.util.find_spec("robustbench")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "helper_files" / \
            "imagenet_test_image_ids.txt"
    return read_ids_file(path) if Path(path).is_file() else None


def model_info_entry(report: Mapping[str, Any], *, additional_data: Optional[bool] = None
                     ) -> tuple[dict[str, Any], list[str]]:
    """A RobustBench ``model_info`` entry from an evaluation report, and the fields left for a
    person to fill. Accuracies are percent strings, as the leaderboard's files hold them."""
    data, attack = report.get("data") or {}, report["attack"]
    dataset = robustbench_dataset(str(data.get("dataset")))
    threat = THREATS[attack["norm"]]
    eps_text = LEADERBOARD_EPS.get((dataset, threat), (None, f"{report['eps']:.6g}"))[1]
    model = report.get("model") or {}
    entry = {"link": "", "name": "", "authors": "", "additional_data": additional_data,
             "number_forward_passes": 1, "dataset": dataset, "venue": "",
             "architecture": str(model.get("arch") or ""), "eps": eps_text,
             "clean_acc": f"{100 * _accuracy(report['clean_accuracy']):.2f}", "reported": "",
             "autoattack_acc": f"{100 * _accuracy(report['robust_accuracy']):.2f}",
             "footnote": ""}
    empty = [k for k in PERSON_FIELDS if entry[k] in ("", None)]
    return entry, empty


def save_adversarial(x_adv: torch.Tensor, indices: Sequence[int], path: str | Path) -> None:
    """``x_adv`` as RobustBench's external evaluations take it: one tensor, in the test set's
    order (by example index), float32 in [0, 1]."""
    order = sorted(range(len(indices)), key=lambda k: indices[k])
    tensor = x_adv.detach().cpu().float()[order].contiguous()
    atomic_write(Path(path), lambda f: torch.save(tensor, f))
