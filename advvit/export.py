"""The export CLI: ``python -m advvit.export`` (also ``advvit-export``).

checkpoint -> a timm model folder ready for the Hugging Face Hub: ``model.safetensors`` and
``config.json`` (:func:`advvit.checkpoint.export_timm`) and a ``README.md`` model card: the Hub's
metadata with a model-index of the results of the given ``advvit.eval`` reports (data set,
threat model, eps, clean and robust accuracy, attack), the training recipe from the run's
``args.yaml``, and the input contract (pixels in [0, 1], the normalization of config.json).

Examples::

    python -m advvit.export runs/xcit/best.pth hub/xcit --report aa.json --report pgd.json
    huggingface-cli upload ORG/NAME hub/xcit     # publishing is the Hub's own client

The folder loads with ``timm.create_model("local-dir:hub/xcit", pretrained=True)`` (behind its
normalization: ``timm.data.resolve_data_config`` + ``create_transform``), and in advvit as
``--checkpoint local-dir:hub/xcit`` or, once uploaded, ``hf-hub:ORG/NAME``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from .checkpoint import CheckpointError, export_timm, load_checkpoint
from .io import OptionError, atomic_write_text, input_file, sha256_file

__all__ = ["build_parser", "model_card", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advvit-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="advvit checkpoint (.pth)")
    p.add_argument("output", help="the folder to write (model.safetensors, config.json, "
                   "README.md)")
    p.add_argument("--report", action="append", default=[], metavar="JSON",
                   help="an advvit.eval report of this checkpoint, for the model-index (repeat)")
    p.add_argument("--args-yaml", help="the run's args.yaml (default: next to the checkpoint)")
    p.add_argument("--name", help="the model's name in the card (default: the output folder's)")
    p.add_argument("--license", default="apache-2.0", help="the card's license id")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even where the "
                   "checkpoint holds EMA weights")
    return p


def _eps_text(eps: float, norm: str) -> str:
    return f"{eps * 255:.4g}/255" if norm == "linf" else f"{eps:.4g}"


def _report(path: str, sha256: str) -> dict[str, Any]:
    report = json.loads(input_file(path, "--report", example="report.json").read_text())
    if "clean_accuracy" not in report or "attack" not in report:
        raise OptionError(f"--report {path} is not an advvit.eval report (no clean_accuracy / "
                          "attack)")
    if (report.get("model") or {}).get("sha256") != sha256:
        raise OptionError(f"--report {path} evaluated another model (sha256 "
                          f"{str((report.get('model') or {}).get('sha256'))[:12]}…): give this "
                          "checkpoint's reports")
    return report


def _accuracy(value: Any) -> float:
    """An accuracy of a report in percent (a flagged number is a dict holding its value)."""
    return round(100 * float(value["value"] if isinstance(value, Mapping) else value), 2)


def _result(report: Mapping[str, Any]) -> dict[str, Any]:
    attack, data = report["attack"], report.get("data") or {}
    norm, eps = attack["norm"], report["eps"]
    threat = f"{norm} eps {_eps_text(eps, norm)}"
    return {"task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": data.get("dataset"), "type": data.get("dataset"),
                        "split": data.get("split")},
            "metrics": [{"type": "accuracy", "name": "clean accuracy",
                         "value": _accuracy(report["clean_accuracy"])},
                        {"type": "accuracy", "name": f"robust accuracy ({attack['name']}, {threat})",
                         "value": _accuracy(report["robust_accuracy"])}]}


def model_card(ckpt: Mapping[str, Any], config: Mapping[str, Any], reports: Sequence[Mapping[str, Any]],
               recipe: Optional[Mapping[str, Any]], *, name: str, license_id: str) -> str:
    """The README.md of an exported folder: Hub metadata (YAML front matter with a model-index)
    and the text a reader needs: input contract, results, recipe, how to load."""
    spec, meta = ckpt["spec"], ckpt["meta"]
    datasets = sorted({str((r.get("data") or {}).get("dataset")) for r in reports})
    front = {"library_name": "timm", "license": license_id,
             "tags": ["image-classification", "timm", "adversarial-robustness", "advvit"],
             "pipeline_tag": "image-classification",
             **({"datasets": datasets} if datasets else {}),
             "model-index": [{"name": name, "results": [_result(r) for r in reports]}]}
    pcfg = config["pretrained_cfg"]
    mean, std = pcfg["mean"], pcfg["std"]
    normalized = spec["normalize"] is not None
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"A `{spec['arch']}` ({spec['num_classes']} classes, {spec['in_chans']} channels, "
             f"input {spec['img_size']}) trained with advvit"
             + (f" against {meta['train_norm']} attacks of eps {_eps_text(meta['train_eps'], meta['train_norm'])}"
                if meta.get("train_norm") and meta.get("train_eps") else "") + ".", "",
             "## Input contract", "",
             "Pixels in [0, 1], then " + (f"`(x - mean) / std` with mean {list(mean)} and std "
                                          f"{list(std)} (config.json's `pretrained_cfg`)"
                                          if normalized else "nothing: the model takes them as "
                                          "they are (config.json's mean 0, std 1)")
             + ". timm's `resolve_data_config` + `create_transform` apply it; apply it once: "
             "advvit's `local-dir:` / `hf-hub:` references put it inside the model.", ""]
    if reports:
        lines += ["## Results", "", "| data set | split | n | attack | threat model | clean (%) "
                  "| robust (%) |", "|---|---|---|---|---|---|---|"]
        for r in reports:
            data, attack = r.get("data") or {}, r["attack"]
            lines.append(f"| {data.get('dataset')} | {data.get('split')} | {r.get('n')} | "
                         f"{attack['name']} | {attack['norm']} eps "
                         f"{_eps_text(r['eps'], attack['norm'])} | "
                         f"{_accuracy(r['clean_accuracy']):.2f} | "
                         f"{_accuracy(r['robust_accuracy']):.2f} |")
        lines.append("")
    if recipe:
        lines += ["## Training recipe", "", "The run's `args.yaml`:", "", "```yaml",
                  yaml.safe_dump(dict(recipe), sort_keys=False).rstrip(), "```", ""]
    lines += ["## Loading", "", "```python", "import timm",
              "model = timm.create_model(\"hf-hub:ORG/NAME\", pretrained=True)  # or local-dir:FOLDER",
              "```", "",
              "In advvit: `python -m advvit.eval --checkpoint hf-hub:ORG/NAME ...`."]
    if (config.get("advvit") or {}).get("requires"):
        lines += ["", f"Requires `{config['advvit']['requires']}`."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the export CLI; returns the exit status (2 for a bad argument)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = input_file(args.checkpoint, "checkpoint", example="best.pth")
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            raise OptionError(f"checkpoint: {err}") from None
        reports = [_report(r, sha256_file(path)) for r in args.report]
        recipe_file = Path(args.args_yaml) if args.args_yaml else path.parent / "args.yaml"
        if args.args_yaml:
            input_file(recipe_file, "--args-yaml", example="args.yaml")
        recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    except OptionError as err:
        parser.error(str(err))
    out = export_timm(path, args.output, use_ema=not args.no_ema)
    config = json.loads((out / "config.json").read_text())
    card = model_card(ckpt, config, reports, recipe, name=args.name or out.resolve().name,
                      license_id=args.license)
    atomic_write_text(out / "README.md", card)
    print(f"exported: {out} (model.safetensors, config.json, README.md)"
          + ("" if recipe else f"; no args.yaml at {recipe_file}: the card has no recipe"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
