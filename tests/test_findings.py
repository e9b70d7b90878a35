"""The findings runner: experiment files, plan, skip and resume, verdicts, extractors, schema."""
import json
import math
import os
import re
import textwrap

import numpy as np
import pytest
import yaml

from advvit.findings import extract as X
from advvit.findings import verdict as V
from advvit.findings.__main__ import main as findings_main
from advvit.findings.plan import plan_lines, status, units
from advvit.findings.markdown import render, shared_runs, suite_holm
from advvit.findings.results import SchemaError, build_result, compare_measurement, \
    measurement_unit, rebuild_result, validate_result, write_result
from advvit.findings.runner import RunFailed, run_experiment, run_unit
from advvit.findings.spec import FindingsError, load_experiment, load_experiments
from advvit.io import sha256_file
from advvit.trainer import KILL_ENV
from test_data import make_idx_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "configs", "findings")


# ------------------------------------------------------------------------------------------
# Experiment files
# ------------------------------------------------------------------------------------------

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def _train_config(tmp_path, **extra):
    data = tmp_path / "fmnist"
    if not data.exists():
        make_idx_folder(data, n_train=32, n_test=16)
    values = {"dataset": "fashion_mnist", "data_dir": str(data), "model": "xcit_nano_12_p8_32",
              "img_size": 32, "batch_size": 8, "workers": 0, "epochs": 1, "warmup_epochs": 0,
              "cooldown_epochs": 0, "min_lr": 0.0, "eps": 8 / 255, "eps_warmup_epochs": 0.0,
              "log_interval": 1, "tensorboard": False, "max_steps_per_epoch": 3,
              "eval_batches": 1, "smoothing": 0.0, **extra}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _tiny_experiment(tmp_path, seeds="[0]", extra=""):
    train = _train_config(tmp_path)
    data = tmp_path / "fmnist"
    return _write(tmp_path / "exp" / "t1_tiny.yaml", f"""\
        claim: 99
        title: weight decay 0.5 beats 0 on a tiny run
        paper: none
        setting: two settings, a few steps
        train_config: {train}
        seeds: {seeds}
        settings:
          wd0:
            train: {{weight_decay: 0.0}}
            minutes: 0.2
          wd05:
            train: {{weight_decay: 0.5}}
            minutes: 0.2
        evals:
          pgd:
            args: [--dataset, fashion_mnist, --data-dir, {data}, --split, test, --n-examples,
                   "8", --attack, pgd, --steps, "1", --eps, 8/255, --batch-size, "8"]
            minutes: 0.1
        tests:
          - {{name: robust, higher: pgd.robust@wd05, lower: pgd.robust@wd0}}
        {extra}""")


def test_every_shipped_experiment_loads_and_plans():
    exps = load_experiments(SHIPPED)
    assert sorted({e.claim for e in exps}) == list(range(1, 13))
    for e in exps:
        assert len(e.seeds) >= 2, e.id
        assert units(e, "/nonexistent")
    lines, total = plan_lines(exps, "/nonexistent")
    assert total > 0 and lines[-1].startswith("total still to run")


def test_shipped_experiments_that_train_the_same_share_one_run():
    a = load_experiment(os.path.join(SHIPPED, "01_deit.yaml"))
    b = load_experiment(os.path.join(SHIPPED, "02_eps_warmup.yaml"))
    folder = {u.key: u.folder for u in units(a, "r") + units(b, "r") if u.kind == "train"}
    assert folder["train xcit s0"] == folder["train warmup s0"]
    assert folder["train xcit s0"] != folder["train xcit s1"]
    assert folder["train xcit s0"] != folder["train none s0"]


@pytest.mark.parametrize("change, key", [
    ("settings:\n  wd0: {trian: {}}\n", "settings.wd0.trian"),
    ("tests:\n  - {higher: pgd.robust@nope, lower: pgd.robust@wd0}\n", "tests[0]"),
    ("tests:\n  - {higher: pgd.robustness@wd05, lower: pgd.robust@wd0}\n", "tests[0]"),
    ("tests:\n  - {higher: pgd-robust, lower: pgd.robust@wd0}\n", "tests[0].higher"),
    ("tests:\n  - {kind: below, value: pgd.robust@wd0}\n", "tests[0].threshold"),
    ("seeds: zero\n", "seeds"),
    ("seeds: [0, 0]\n", "seeds"),
    ("settings:\n  wd0: {train: {seed: 3}}\n", "settings.wd0.train.seed"),
    ("settings:\n  wd0: {finetune_from: wd9}\n", "settings.wd0.finetune_from"),
    ("colour: red\n", "colour"),
    ("claim: true\n", "claim"),
    ("use_evals: pgd\n", "use_evals"),
    ("tests:\n  - {kind: close, higher: pgd.robust@wd05, lower: pgd.robust@wd0, threshold: 0}\n",
     "tests[0].threshold"),
    ("settings:\n  a: {}\n  b: {finetune_from: a}\n  c: {finetune_from: b}\n",
     "settings.c.finetune_from"),
    ("settings:\n  a: {finetune_from: a}\n", "settings.a.finetune_from"),
    ("analyses:\n  pgd: {command: jacobian}\n", "analyses.pgd"),
])
def test_bad_experiment_files_name_the_key(tmp_path, change, key):
    path = _tiny_experiment(tmp_path)
    raw = yaml.safe_load(open(path))
    raw.update(yaml.safe_load(change))
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    with pytest.raises(FindingsError, match=re.escape(f"key '{key}'")):
        load_experiment(path, defaults={})


@pytest.mark.parametrize("metric, ok", [("ends_min", True), ("ends_mn", False)])
def test_an_analysis_metric_the_extractor_does_not_give_is_refused(tmp_path, metric, ok):
    # A misspelt metric used to load, run every unit and then read as "not run" forever.
    path = _tiny_experiment(tmp_path)
    raw = yaml.safe_load(open(path))
    raw["analyses"] = {"jac": {"command": "jacobian"}}
    raw["tests"] = [{"higher": f"jac.{metric}@wd0", "lower": "jac.middle_max@wd0"}]
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    if ok:
        assert load_experiment(path, defaults={}).tests[0].higher.metric == metric
    else:
        with pytest.raises(FindingsError, match=r"key 'tests\[0\]'.*jacobian measures no 'ends_mn'"):
            load_experiment(path, defaults={})


def test_a_missing_training_config_is_refused(tmp_path):
    path = _tiny_experiment(tmp_path)
    os.remove(tmp_path / "train.yaml")
    with pytest.raises(FindingsError, match="train_config.*no such file"):
        load_experiment(path, defaults={})


def test_the_cli_refuses_an_unknown_experiment_with_exit_2(tmp_path, capsys):
    _tiny_experiment(tmp_path)
    assert findings_main(["plan", "nope", "--configs", str(tmp_path / "exp")]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Plan and skip, with a runner that only writes each unit's output
# ------------------------------------------------------------------------------------------

def _fake_runner(calls, robust=None):
    """Writes each unit's output; ``robust(unit)`` gives an evaluation's robust accuracy
    (default 0.25 for wd0, 0.3 otherwise)."""
    def run(unit, **_):
        calls.append(unit.key)
        os.makedirs(os.path.dirname(unit.output), exist_ok=True)
        if unit.kind == "eval":
            value = (robust(unit) if robust is not None
                     else 0.25 if "wd0 " in unit.key + " " else 0.3)
            payload = {"format": "advvit-eval/1", "clean_accuracy": 0.5, "n": 10 ** 6,
                       "robust_accuracy": {"value": value}}
            if os.path.isfile(unit.checkpoints[0]):
                payload["model"] = {"path": unit.checkpoints[0],
                                    "sha256": sha256_file(unit.checkpoints[0])}
        else:
            payload = {"seconds": 1.0}
        with open(unit.output, "w") as fh:
            json.dump(payload, fh)
        return 1.0
    return run


def test_plan_orders_training_first_and_skips_what_is_done(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    root = str(tmp_path / "root")
    calls = []
    run_experiment(exp, root, runner=_fake_runner(calls), say=lambda s: None)
    assert calls == ["train wd0 s0", "train wd05 s0", "eval pgd wd0 s0", "eval pgd wd05 s0"]
    again = []
    run_experiment(exp, root, runner=_fake_runner(again), say=lambda s: None)
    assert again == []
    lines, total = plan_lines([exp], root)
    assert total == 0 and all("done" in line for line in lines if line.startswith("    "))


def test_an_experiments_length_is_measured_where_its_units_are_done(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    root = str(tmp_path / "root")
    # Declared: two trainings of 0.2 min and two evaluations of 0.1 min.
    assert "alone ~0.6 min; still to run ~0.6 min" in plan_lines([exp], root)[0][1]
    fake = _fake_runner([])

    def slow_training(unit, **kw):
        fake(unit, **kw)
        if unit.kind == "train":   # 25 minutes each, measured: over the 45-minute limit
            with open(unit.output, "w") as fh:
                json.dump({"seconds": 1500.0}, fh)
        return 1.0
    run_experiment(exp, root, runner=slow_training, say=lambda s: None)
    head = plan_lines([exp], root)[0][1]
    assert "alone ~50.2 min; still to run ~0 min  [over the 45-minute limit]" in head


def test_an_experiment_can_change_a_shared_evaluations_estimate_alone():
    shared = load_experiment(os.path.join(SHIPPED, "01_deit.yaml"))
    own = load_experiment(os.path.join(SHIPPED, "08_attention_vs_conv.yaml"))
    a, b = (next(e for e in x.evals if e.name == "apgd") for x in (shared, own))
    assert (a.args, a.minutes) == (b.args, 3.6) and b.minutes == 2


def test_a_training_run_with_a_checkpoint_but_no_marker_is_partial(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    train = units(exp, str(tmp_path / "root"))[0]
    assert status(train) == "pending"
    os.makedirs(train.folder)
    open(os.path.join(train.folder, "recovery.pth"), "wb").close()
    assert status(train) == "partial"
    lines, _ = plan_lines([exp], str(tmp_path / "root"))
    assert any("train wd0 s0" in line and "partial" in line for line in lines)


def test_a_measurement_of_a_checkpoint_that_changed_since_is_rerun(tmp_path):
    # An evaluation's JSON outlived its checkpoint (the run resumed and finished after it, or
    # was retrained): it used to stay "done" and its old number went into the verdict.
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    root = str(tmp_path / "root")
    trains = [u for u in units(exp, root) if u.kind == "train"]
    for t in trains:
        os.makedirs(t.folder)
        with open(os.path.join(t.folder, "best.pth"), "wb") as fh:
            fh.write(b"first")
    run_experiment(exp, root, runner=_fake_runner([]), say=lambda s: None)
    ev = next(u for u in units(exp, root) if u.key == "eval pgd wd0 s0")
    assert status(ev) == "done"
    with open(os.path.join(trains[0].folder, "best.pth"), "wb") as fh:
        fh.write(b"second")
    open(ev.output + ".state", "w").close()
    assert status(ev) == "stale"
    lines, _ = plan_lines([exp], root)
    assert any("eval pgd wd0 s0" in line and "stale" in line for line in lines)
    said, calls = [], []
    run_experiment(exp, root, runner=_fake_runner(calls), say=said.append)
    assert calls == ["eval pgd wd0 s0"] and any("rerun" in line for line in said)
    assert not os.path.exists(ev.output + ".state") and status(ev) == "done"


def test_a_semantic_analysis_is_stale_when_a_judge_changed(tmp_path):
    exp = load_experiment(os.path.join(SHIPPED, "05_semantic.yaml"))
    root = str(tmp_path / "root")
    unit = next(u for u in units(exp, root) if u.kind == "analysis" and u.seed == 0)
    judges = [unit.command[i + 1] for i, w in enumerate(unit.command) if w == "--judge"]
    assert len(judges) == 2
    for path in (*unit.checkpoints, *judges):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(path.encode())
    os.makedirs(unit.folder)
    with open(unit.output, "w") as fh:
        json.dump({"models": [{"sha256": sha256_file(p)} for p in unit.checkpoints],
                   "judges": [{"sha256": sha256_file(p)} for p in judges]}, fh)
    assert status(unit) == "done"
    with open(judges[1], "wb") as fh:
        fh.write(b"retrained")
    assert status(unit) == "stale"


def test_finetuned_settings_train_after_their_source_and_point_at_it(tmp_path):
    path = _tiny_experiment(tmp_path)
    raw = yaml.safe_load(open(path))
    raw["settings"] = {"tuned": {"finetune_from": "base", "train": {"lr": 1e-4}}, "base": {}}
    raw["tests"] = [{"higher": "pgd.robust@tuned", "lower": "pgd.robust@base"}]
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    exp = load_experiment(path, defaults={})
    trains = [u for u in units(exp, "r") if u.kind == "train"]
    assert [u.setting for u in trains] == ["base", "tuned"]
    assert trains[1].config["finetune"] == os.path.join(trains[0].folder, "best.pth")
    assert trains[1].needs == (trains[0].key,)


# ------------------------------------------------------------------------------------------
# The real commands, end to end: run, result file, skip, and resume after a kill
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_tiny_experiment_runs_end_to_end_and_writes_a_valid_result(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    root, results = str(tmp_path / "root"), str(tmp_path / "docs")
    ran = run_experiment(exp, root, say=lambda s: None, env={"OMP_NUM_THREADS": "1"})
    assert list(ran) == [u.key for u in units(exp, root)]
    for u in units(exp, root):
        assert status(u) == "done", u.key
    marker = json.load(open(units(exp, root)[0].output))
    assert marker["config"]["weight_decay"] == 0.0 and marker["seconds"] > 0
    data = build_result(exp, root, "python -m advvit.findings run t1_tiny")
    path = write_result(data, results)
    saved = json.load(open(path))
    validate_result(saved)
    assert saved["complete"] and saved["figure"] == "t1_tiny.png"
    assert os.path.isfile(os.path.join(results, "t1_tiny.png"))
    # One seed: no spread, so no verdict either way.
    assert saved["verdict"] == V.CANNOT_TELL and saved["tests"][0]["verdict"] == V.CANNOT_TELL
    assert {m["setting"] for m in saved["measurements"]} == {"wd0", "wd05"}
    # Complete enough to trace a mismatch: each run's resolved config, code, threads and
    # checkpoints; each measurement's command, code, environment, files read and time.
    run = saved["runs"]["wd05 s0"]
    assert run["config"]["weight_decay"] == 0.5 and run["config"]["threads"] is not None
    assert run["omp_num_threads"] == "1" and "torch" in run["versions"]
    assert run["sha256"]["best.pth"] == sha256_file(os.path.join(run["folder"], "best.pth"))
    m = next(m for m in saved["measurements"] if m["setting"] == "wd05")
    p = m["provenance"]
    assert p["sha256"] == [run["sha256"]["best.pth"]] and p["seconds"] > 0
    assert p["command"][p["command"].index("--checkpoint") + 1] == m["checkpoint"]
    assert p["environment"]["torch_threads"] == 1 and "timm" in p["versions"]
    assert saved["created"] == max(x["provenance"]["created"] for x in saved["measurements"])
    assert run_experiment(exp, root, say=lambda s: None) == {}


@pytest.mark.slow
def test_a_killed_training_run_is_resumed_not_restarted(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    raw = yaml.safe_load(open(tmp_path / "train.yaml"))
    raw.update(max_steps_per_epoch=4, recovery_interval_steps=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    exp = load_experiment(exp.path, defaults={})
    root = str(tmp_path / "root")
    first = units(exp, root)[0]
    with pytest.raises(RunFailed, match="train wd0 s0 failed"):
        run_experiment(exp, root, say=lambda s: None,
                       env={KILL_ENV: "recovery_saved:2", "OMP_NUM_THREADS": "1"})
    assert status(first) == "partial"
    assert not os.path.exists(first.output)
    run_experiment(exp, root, say=lambda s: None, env={"OMP_NUM_THREADS": "1"})
    assert status(first) == "done"
    history = yaml.safe_load(open(os.path.join(first.folder, "resume_history.yaml")))
    assert history and history[0]["checkpoint"].endswith("recovery.pth") and history[0]["step"] >= 1


# ------------------------------------------------------------------------------------------
# Verdicts on made-up numbers
# ------------------------------------------------------------------------------------------

S = V.summarize


@pytest.mark.parametrize("higher, lower, expected", [
    ([0.60, 0.62], [0.50, 0.52], V.HOLDS),                # 10 points, spread 1.4
    ([0.50, 0.52], [0.60, 0.62], V.DOES_NOT_HOLD),        # the opposite, clearly
    ([0.601, 0.602], [0.600, 0.601], V.DOES_NOT_HOLD),    # 0.1 point, tight: no effect worth it
    ([0.60, 0.70], [0.58, 0.62], V.CANNOT_TELL),          # within the noise
    ([0.70], [0.50], V.CANNOT_TELL),                      # one seed: no spread
])
def test_greater_verdicts(higher, lower, expected):
    assert V.greater("t", S(higher), S(lower), min_effect=0.01).verdict == expected


def test_greater_reads_the_t_quantile_at_its_degrees_of_freedom():
    r = V.greater("t", S([0.6, 0.8]), S([0.4, 0.4]), min_effect=0.01)
    assert r.difference == pytest.approx(0.3)
    assert r.se == pytest.approx(0.1)        # sample variance 0.02 over 2 seeds, plus 0
    # One side's spread alone: 1 degree of freedom, t 12.71, where 2 standard errors held.
    assert r.df == pytest.approx(1) and r.critical == pytest.approx(12.706, abs=1e-3)
    assert r.verdict == V.CANNOT_TELL
    four = V.greater("t", S([0.6, 0.8, 0.6, 0.8]), S([0.4] * 4), min_effect=0.01)
    assert four.df == pytest.approx(3) and four.critical == pytest.approx(3.182, abs=1e-3)
    assert four.verdict == V.HOLDS and four.p < 0.05


def test_welch_satterthwaite_degrees_of_freedom():
    # Equal variance terms of df 1 each: 2 df; a known term (df inf) adds variance, not df.
    assert V.satterthwaite([(1.0, 1), (1.0, 1)]) == pytest.approx((2.0, 2.0))
    assert V.satterthwaite([(1.0, 1), (1.0, math.inf)]) == pytest.approx((2.0, 4.0))
    assert V.satterthwaite([(0.0, 1)])[1] == math.inf


@pytest.mark.parametrize("values, expected", [
    ([0.01, 0.015, 0.02], V.HOLDS), ([0.09, 0.095, 0.10], V.DOES_NOT_HOLD),
    ([0.01, 0.02], V.CANNOT_TELL),          # 1 df: t 12.7 spans the threshold
    ([0.02, 0.09], V.CANNOT_TELL)])
def test_below_verdicts(values, expected):
    assert V.below("t", S(values), 0.05).verdict == expected


@pytest.mark.parametrize("a, b, expected", [
    ([0.800, 0.802], [0.801, 0.803], V.HOLDS), ([0.80, 0.81], [0.70, 0.71], V.DOES_NOT_HOLD),
    ([0.80, 0.84], [0.79, 0.80], V.CANNOT_TELL)])
def test_close_verdicts(a, b, expected):
    assert V.close("t", S(a), S(b), 0.01).verdict == expected


def test_combine_needs_every_test_to_hold():
    assert V.combine([V.HOLDS, V.HOLDS]) == V.HOLDS
    assert V.combine([V.HOLDS, V.CANNOT_TELL]) == V.CANNOT_TELL
    assert V.combine([V.CANNOT_TELL, V.DOES_NOT_HOLD]) == V.DOES_NOT_HOLD
    assert V.combine([V.DOES_NOT_HOLD, V.UNTRUSTWORTHY]) == V.UNTRUSTWORTHY
    assert V.combine([]) == V.CANNOT_TELL


def test_close_is_a_tost_on_the_90_percent_interval():
    # Spread 0.0028 a side over 2 seeds: se 0.0028, df 2, t(0.95) 2.92: [-0.0063, +0.0103].
    r = V.close("t", S([0.802, 0.806]), S([0.800, 0.804]), 0.011)
    assert r.level == pytest.approx(0.90) and r.critical == pytest.approx(2.920, abs=1e-3)
    assert r.verdict == V.HOLDS and r.p < 0.05
    assert V.close("t", S([0.802, 0.806]), S([0.800, 0.804]), 0.007).verdict == V.CANNOT_TELL


def test_holm_adjusts_step_down():
    assert V.holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert V.holm([]) == []


def test_summaries_refuse_nan():
    with pytest.raises(ValueError):
        S([0.5, float("nan")])


# ------------------------------------------------------------------------------------------
# Extractors on reports with known numbers
# ------------------------------------------------------------------------------------------

def _analysis(command, results, names):
    return {"format": "advvit-analyze/1", "analysis": command, "model_names": names,
            "results": results, "settings": {"k": 5}}


def test_jacobian_extractor_compares_the_ends_with_the_middle():
    report = _analysis("jacobian", {"m": {"sigma_mean": [5.0, 2.0, 3.0, 1.0, 4.0]}}, ["m"])
    [m] = X.extract("jacobian", report, ["s"])
    assert m == {"first": 5.0, "last": 4.0, "middle_max": 3.0, "middle_mean": 2.0, "ends_min": 4.0,
                 "block0": 5.0, "block1": 2.0, "block2": 3.0, "block3": 1.0, "block4": 4.0}


def test_lesion_extractor_averages_drops_over_the_blocks_with_the_part():
    result = {"kinds": ["attn", "lpi", "mlp", "block"], "baseline_clean": 0.8,
              "baseline_robust": 0.5,
              "clean_accuracy": [[0.6, 0.7], [0.8, None], [0.75, 0.8], [0.5, 0.7]],
              "robust_accuracy": [[0.4, 0.5], [0.5, None], [0.5, 0.5], [0.3, 0.5]]}
    [m] = X.extract("lesions", _analysis("lesions", {"m": result}, ["m"]), ["s"])
    assert m["attn_drop"] == pytest.approx(0.15) and m["lpi_drop"] == pytest.approx(0.0)
    assert m["mlp_drop"] == pytest.approx(0.025) and m["block_drop"] == pytest.approx(0.2)
    assert m["block_drop_max"] == pytest.approx(0.3)
    assert m["block_drop_max_rest"] == pytest.approx(0.1)    # the paper's form: not the first
    assert m["robust_attn_drop"] == pytest.approx(0.05)
    assert m["lpi_drop0"] == pytest.approx(0.0) and "lpi_drop1" not in m
    assert all(X.known_metric("lesions", k) for k in m)


def test_transfer_extractor_separates_within_and_cross_architecture():
    # models: a0, a1 (setting a), b0, b1 (setting b); entry [i][j]: target j on source i's.
    matrix = [[0.0, 0.2, 0.8, 0.6], [0.4, 0.0, 0.7, 0.9], [0.5, 0.3, 0.0, 0.1], [0.6, 0.6, 0.3, 0.0]]
    report = _analysis("transfer", {"transfer_accuracy": matrix, "accuracy": matrix,
                                    "n_fooled": [9, 9, 9, 9]}, ["a0", "a1", "b0", "b1"])
    out = X.extract("transfer", report, ["a", "a", "b", "b"])
    assert out[0]["within"] == pytest.approx(0.2) and out[0]["cross"] == pytest.approx(0.7)
    assert out[3]["within"] == pytest.approx(0.3) and out[3]["cross"] == pytest.approx(0.6)


def test_semantic_extractor_averages_over_judges():
    rows = [{"source": "r", "judge": j, "perturbation_top1": p, "perturbation_top5": p + 0.3,
             "random_top1": 0.1} for j, p in (("j1", 0.4), ("j2", 0.2))]
    rows += [{"source": "c", "judge": "j1", "perturbation_top1": 0.1, "perturbation_top5": 0.5,
              "random_top1": 0.1}]
    report = _analysis("semantic", {"rows": rows}, ["r", "c"])
    out = X.extract("semantic", report, ["robust", "clean"])
    assert out[0]["top1"] == pytest.approx(0.3) and out[1]["top1"] == pytest.approx(0.1)


def test_the_binomial_bound_holds_for_any_mean_of_scores_in_the_unit_interval():
    # The bound the analyses' accuracy terms use: a per-image score in [0, 1] (the mean of
    # several correct/wrong outcomes on one image) with mean p has variance at most p(1-p),
    # with equality for 0/1 scores.
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 20))
        outcomes = rng.random((k, 500)) < rng.random((k, 1)) * rng.random(500)
        scores = outcomes.mean(axis=0)
        p = scores.mean()
        assert scores.var() <= p * (1 - p) + 1e-12
    single = (rng.random(500) < 0.3).astype(float)
    assert single.var() == pytest.approx(single.mean() * (1 - single.mean()))


def test_analysis_extractors_give_each_metric_its_sampling_term():
    var, n = X.sampling_keys, "#n"
    report = _analysis("jacobian", {"m": {"sigma_mean": [5.0, 2.0, 3.0, 1.0, 4.0],
                                          "sigma_std": [1.0, 0.5, 2.0, 0.5, 1.5]}}, ["m"])
    report["data"] = {"n_examples": 64}
    [m] = X.extract("jacobian", report, ["s"])
    assert m[var("first")[0]] == pytest.approx(1 / 64) and m["first" + n] == 64
    assert m[var("middle_max")[0]] == pytest.approx(4 / 64)        # block 2 gives the max
    assert m[var("ends_min")[0]] == pytest.approx(2.25 / 64)       # the last block, 4 < 5
    assert m[var("middle_mean")[0]] == pytest.approx(1.0 ** 2 / 64)
    lesions = {"kinds": ["attn", "block"], "baseline_clean": 0.8, "baseline_robust": 0.5,
               "clean_accuracy": [[0.6, 0.7], [0.5, 0.7]], "robust_accuracy": [[0.4, 0.5]] * 2}
    report = _analysis("lesions", {"m": lesions}, ["m"])
    report["data"] = {"n_examples": 100}
    [m] = X.extract("lesions", report, ["s"])
    assert m[var("attn_drop0")[0]] == pytest.approx((0.8 * 0.2 + 0.6 * 0.4) / 100)
    assert m[var("attn_drop")[0]] == pytest.approx((0.8 * 0.2 + 0.65 * 0.35) / 100)
    assert m[var("block_drop_max_rest")[0]] == pytest.approx((0.16 + 0.7 * 0.3) / 100)
    corr = _analysis("corruptions", {"models": {"m": {"mean_corruption_accuracy": 0.5,
                                                      "clean_accuracy": 0.8, "n": 2000}}}, ["m"])
    [m] = X.extract("corruptions", corr, ["s"])
    assert m[var("mean")[0]] == pytest.approx(0.25 / 2000) and m["mean" + n] == 2000
    # The delta method's term against the ratio of two independent binomial accuracies.
    rng = np.random.default_rng(1)
    ratios = rng.binomial(2000, 0.5, 200_000) / rng.binomial(2000, 0.8, 200_000)
    assert m[var("relative")[0]] == pytest.approx(ratios.var(), rel=0.03)
    transfer = _analysis("transfer", {"transfer_accuracy": [[0.0, 0.2], [0.4, 0.0]],
                                      "accuracy": [[0.1, 0.2], [0.4, 0.05]],
                                      "n_fooled": [50, 1]}, ["a0", "a1"])
    transfer["data"] = {"n_examples": 512}
    a0, a1 = X.extract("transfer", transfer, ["a", "a"])
    assert a0[var("within")[0]] == pytest.approx(0.2 * 0.8 / 50) and a0["within" + n] == 50
    assert a0[var("white_box")[0]] == pytest.approx(0.1 * 0.9 / 512)
    assert var("within")[0] not in a1          # one fooled example: no spread to speak of
    # Reports that do not say how many images they ran on give no term.
    assert not any("#" in k for k in X.extract("jacobian", _analysis(
        "jacobian", {"m": {"sigma_mean": [5.0, 2.0, 3.0], "sigma_std": [1.0, 1.0, 1.0]}},
        ["m"]), ["s"])[0])


def _analysis_runner(command, result):
    """Trainings, and ``command`` reports of 64 images whose per-model results are
    ``result(setting, seed)``."""
    def run(unit, **_):
        os.makedirs(os.path.dirname(unit.output), exist_ok=True)
        payload = {"seconds": 1.0}
        if unit.kind == "analysis":
            names = [f"m{i}" for i in range(len(unit.settings))]
            payload = {"format": "advvit-analyze/1", "analysis": command, "settings": {},
                       "data": {"n_examples": 64, "indices": list(range(64))},
                       "model_names": names, "models": [{"sha256": None}] * len(names),
                       "results": {n: result(setting, seed) for n, setting, seed
                                   in zip(names, unit.settings, unit.seeds)}}
            if command == "corruptions":
                payload["results"] = {"models": payload["results"]}
        with open(unit.output, "w") as fh:
            json.dump(payload, fh)
        return 1.0
    return run


def _analysis_experiment(tmp_path, command, tests):
    path = _tiny_experiment(tmp_path, seeds="[0, 1]")
    raw = yaml.safe_load(open(path))
    raw.pop("evals")
    raw["analyses"] = {"an": {"command": command, "per": "run", "args": []}}
    raw["tests"] = tests
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    return load_experiment(path, defaults={})


@pytest.mark.parametrize("std, verdict", [(0.5, V.HOLDS), (6.0, V.CANNOT_TELL)])
def test_an_analysis_test_is_judged_with_its_images_sampling_term(tmp_path, std, verdict):
    # Block norms 5, 2, 3 for wd05 and 4, 2, 3 for wd0 (seed 1's first 0.1 higher), each with
    # the spread ``std`` over the 64 images.
    exp = _analysis_experiment(tmp_path, "jacobian", [
        {"name": "first", "higher": "an.first@wd05", "lower": "an.first@wd0"}])
    root = str(tmp_path / "root")
    run_experiment(exp, root, say=lambda s: None, runner=_analysis_runner(
        "jacobian", lambda setting, seed: {
            "sigma_mean": [(5.0 if setting == "wd05" else 4.0) + 0.1 * seed, 2.0, 3.0],
            "sigma_std": [std] * 3}))
    data = build_result(exp, root, "cmd")
    [t] = data["tests"]
    s = data["summaries"]["an.first@wd05"]
    assert s["sampling"] == "per-image" and s["sampling_var"] == pytest.approx(std ** 2 / 64)
    # The seeds' spread 0.0025 a side and the images' std**2 / 64 a side, all four added.
    se = math.sqrt(2 * 0.1 ** 2 / 4 + 2 * std ** 2 / 64)
    assert t["se"] == pytest.approx(se) and t["verdict"] == verdict
    assert not any("no per-example spread" in g for g in data["gaps"])
    m = data["measurements"][0]
    assert m["sampling"]["first"] == {"var": pytest.approx(std ** 2 / 64), "n": 64}
    assert "#" not in "".join(m["metrics"])
    # Judged anew from the record alone, the term is the same; without it, the seeds alone.
    assert rebuild_result(exp, data, "cmd")["tests"][0]["se"] == pytest.approx(se)
    old = json.loads(json.dumps(data))
    for m in old["measurements"]:
        del m["sampling"]
    again = rebuild_result(exp, old, "cmd")
    assert again["tests"][0]["se"] == pytest.approx(0.1 / math.sqrt(2))
    assert any("no per-example spread for an.first@wd05" in g for g in again["gaps"])


def test_a_ratio_of_means_pairs_through_its_linearized_per_image_values():
    # Two models' retention (corrupted share over clean accuracy) on the same 2,000 images,
    # whose outcomes move together. The paired term from the linearized values matches the
    # spread of the exact difference of ratios over resampled images.
    rng = np.random.default_rng(0)
    n, tasks = 2000, 75
    ease = rng.random(n)
    def pack(shift):
        clean = rng.random(n) < np.clip(ease + 0.4 + shift, 0, 1)
        counts = rng.binomial(tasks, np.clip(ease * clean + shift, 0, 1))
        report = _analysis("corruptions", {"models": {"m": {"per_example": {
            "tasks": tasks, "tasks_correct": counts.tolist(),
            "clean_correct": clean.astype(int).tolist()}}}}, ["m"])
        report["data"] = {"indices": list(range(n))}
        [packed] = X.analysis_outcomes("corruptions", report)
        return packed, counts / tasks, clean.astype(float)
    (pa, ma, ca), (pb, mb, cb) = pack(0.05), pack(0.0)
    _, ra = X.unpack_outcomes(pa, "relative")
    _, rb = X.unpack_outcomes(pb, "relative")
    assert ra.mean() == pytest.approx(ma.mean() / ca.mean()) and not X.is_binary(pa, "relative")
    paired_se = np.std(ra - rb, ddof=1) / np.sqrt(n)
    draws = rng.integers(0, n, size=(4000, n))
    exact = ma[draws].mean(1) / ca[draws].mean(1) - mb[draws].mean(1) / cb[draws].mean(1)
    assert paired_se == pytest.approx(exact.std(), rel=0.06)
    # Without the pairing the two terms would add: far wider.
    assert np.hypot(ra.std(ddof=1), rb.std(ddof=1)) / np.sqrt(n) > 1.5 * paired_se


def _judged_without_outcomes(exp, data):
    """The record judged anew with its per-example outcomes left out."""
    old = json.loads(json.dumps(data))
    for m in old["measurements"]:
        del m["outcomes"]
    return rebuild_result(exp, old, "cmd")


def test_corruption_accuracies_of_two_settings_are_paired_image_by_image(tmp_path):
    # 75 corruption x severity pairs on 64 images: wd05 is right under 3 more of them than
    # wd0 on images 0-15 and the same on the rest (every image right clean, a share 0.4-0.6
    # right corrupted): per image the difference is 0.04 or 0, where the two sides'
    # binomial bounds alone would be about 0.06 each.
    def result(setting, seed):
        base = [30 + (i % 3) * 7 for i in range(64)]
        counts = [c + 3 * (setting == "wd05" and i < 16) for i, c in enumerate(base)]
        return {"mean_corruption_accuracy": sum(counts) / (75 * 64), "clean_accuracy": 1.0,
                "n": 64, "per_example": {"tasks": 75, "tasks_correct": counts,
                                         "clean_correct": [1] * 64}}
    exp = _analysis_experiment(tmp_path, "corruptions", [
        {"name": "mean", "higher": "an.mean@wd05", "lower": "an.mean@wd0", "min_effect": 0.005}])
    root = str(tmp_path / "root")
    run_experiment(exp, root, runner=_analysis_runner("corruptions", result), say=lambda s: None)
    data = build_result(exp, root, "cmd")
    [t] = data["tests"]
    m = next(m for m in data["measurements"] if m["setting"] == "wd05" and m["seed"] == 1)
    indices, share = X.unpack_outcomes(m["outcomes"], "mean")
    assert indices == list(range(64)) and share[0] == pytest.approx(33 / 75)
    assert share.mean() == pytest.approx(m["metrics"]["mean"])
    d = np.array([3 / 75] * 16 + [0.0] * 48)
    assert t["paired"] and t["mcnemar"] == [] and t["bootstrap"] is not None
    assert t["difference"] == pytest.approx(d.mean())
    assert t["se"] == pytest.approx(math.sqrt(d.var(ddof=1) / 64))   # the seeds agree
    assert t["verdict"] == V.HOLDS
    unpaired = _judged_without_outcomes(exp, data)["tests"][0]
    assert not unpaired["paired"] and unpaired["se"] > 5 * t["se"]
    assert unpaired["verdict"] == V.CANNOT_TELL


def test_lesion_extractor_gives_the_paired_term_from_per_example_outcomes():
    # Four images, two blocks, right intact but for image 3: block 0's attention lesion loses
    # image 1, block 1's loses images 1 and 2 and wins image 3.
    per = {"baseline_clean": [1, 1, 1, 0], "baseline_robust": [1, 0, 0, 0],
           "clean": [[[1, 0, 1, 0], [1, 0, 0, 1]]], "robust": [[[1, 0, 0, 0], [0, 0, 0, 0]]]}
    result = {"kinds": ["attn"], "baseline_clean": 0.75, "baseline_robust": 0.25,
              "clean_accuracy": [[0.5, 0.5]], "robust_accuracy": [[0.25, 0.0]],
              "per_example": per}
    report = _analysis("lesions", {"m": result}, ["m"])
    report["data"] = {"n_examples": 4, "indices": [7, 8, 9, 10]}
    [m] = X.extract("lesions", report, ["s"])
    var = lambda metric: m[X.sampling_keys(metric)[0]]                        # noqa: E731
    assert m["attn_drop0"] == pytest.approx(0.25) and m["attn_drop1"] == pytest.approx(0.25)
    assert var("attn_drop0") == pytest.approx(np.var([0, 1, 0, 0], ddof=1) / 4)
    assert var("attn_drop1") == pytest.approx(np.var([0, 1, 1, -1], ddof=1) / 4)
    assert var("attn_drop") == pytest.approx(np.var([0, 1, 0.5, -0.5], ddof=1) / 4)
    assert var("robust_attn_drop1") == pytest.approx(np.var([1, 0, 0, 0], ddof=1) / 4)
    [packed] = X.analysis_outcomes("lesions", report)
    indices, drop = X.unpack_outcomes(packed, "attn_drop")
    assert indices == [7, 8, 9, 10] and list(drop) == [0, 1, 0.5, -0.5]
    assert drop.mean() == pytest.approx(m["attn_drop"]) and not X.is_binary(packed, "attn_drop")
    # Without the outcomes, the bound: both accuracies' binomial terms.
    del result["per_example"]
    [bound] = X.extract("lesions", report, ["s"])
    assert bound[X.sampling_keys("attn_drop0")[0]] == pytest.approx(0.75 * 0.25 / 4 + 0.25 / 4)
    assert X.analysis_outcomes("lesions", report) == [None]


def test_two_lesion_kinds_of_one_model_are_paired_image_by_image(tmp_path):
    # 64 images, all right intact; two blocks. Each attention lesion loses images 0-15, each
    # MLP lesion images 0-3: per image the attention drop is 1 on 0-15 and the MLP drop 1 on
    # 0-3, moving together, so the paired term is narrower than the two terms added. The drops
    # are 0 or 1 here, but they are drops, not right-or-wrong outcomes: no McNemar.
    def result(setting, seed):
        lost = lambda k: [0 if i < k else 1 for i in range(64)]                # noqa: E731
        per = {"baseline_clean": [1] * 64, "baseline_robust": [1] * 64,
               "clean": [[lost(16)] * 2, [lost(4)] * 2, [lost(16)] * 2],
               "robust": [[lost(16)] * 2, [lost(4)] * 2, [lost(16)] * 2]}
        acc = [[48 / 64] * 2, [60 / 64] * 2, [48 / 64] * 2]
        return {"kinds": ["attn", "mlp", "block"], "baseline_clean": 1.0,
                "baseline_robust": 1.0, "clean_accuracy": acc, "robust_accuracy": acc,
                "per_example": per}
    exp = _analysis_experiment(tmp_path, "lesions", [
        {"name": "mlp_vs_attention", "higher": "an.attn_drop@wd05", "lower": "an.mlp_drop@wd05"},
        {"name": "tolerated", "kind": "below", "value": "an.block_drop@wd05",
         "threshold": 0.5}])
    root = str(tmp_path / "root")
    run_experiment(exp, root, runner=_analysis_runner("lesions", result), say=lambda s: None)
    data = build_result(exp, root, "cmd")
    paired, below = data["tests"]
    d = np.array([0.0] * 4 + [1.0] * 12 + [0.0] * 48)
    assert paired["paired"] and paired["mcnemar"] == [] and paired["bootstrap"] is not None
    assert paired["difference"] == pytest.approx(12 / 64)
    assert paired["se"] == pytest.approx(math.sqrt(d.var(ddof=1) / 64))   # the seeds agree
    block = np.array([1.0] * 16 + [0.0] * 48)
    assert data["summaries"]["an.block_drop@wd05"]["sampling_var"] == pytest.approx(
        block.var(ddof=1) / 64)
    assert below["verdict"] == V.HOLDS
    unpaired = _judged_without_outcomes(exp, data)["tests"][0]
    assert not unpaired["paired"] and unpaired["se"] > 1.2 * paired["se"]


def test_every_metric_an_extractor_gives_is_a_known_metric():
    assert set(X.METRICS) == set(X.EXTRACTORS)
    given = {
        "jacobian": X.extract("jacobian", _analysis(
            "jacobian", {"m": {"sigma_mean": [5.0, 2.0, 3.0]}}, ["m"]), ["s"]),
        "lesions": X.extract("lesions", _analysis("lesions", {"m": {
            "kinds": ["attn", "lpi", "mlp", "conv", "block"], "baseline_clean": 0.8,
            "baseline_robust": 0.5, "clean_accuracy": [[0.6]] * 5,
            "robust_accuracy": [[0.4]] * 5}}, ["m"]), ["s"]),
        "corruptions": X.extract("corruptions", _analysis("corruptions", {"models": {"m": {
            "mean_corruption_accuracy": 0.5, "clean_accuracy": 0.8}}}, ["m"]), ["s"]),
        "transfer": X.extract("transfer", _analysis("transfer", {
            "transfer_accuracy": [[0.0]], "accuracy": [[0.1]], "n_fooled": [3]}, ["m"]), ["s"]),
        "semantic": X.extract("semantic", _analysis("semantic", {"rows": [
            {"source": "m", "judge": "j", "perturbation_top1": 0.1, "perturbation_top5": 0.5,
             "random_top1": 0.1}]}, ["m"]), ["s"]),
    }
    for command, [metrics] in given.items():
        for name in metrics:
            assert X.known_metric(command, name), (command, name)
    assert not X.known_metric("lesions", "attention_drop")


def test_extractors_refuse_the_wrong_report():
    with pytest.raises(X.ExtractError, match="not an advvit-analyze/1 jacobian"):
        X.extract("jacobian", _analysis("lesions", {}, []), [])
    with pytest.raises(X.ExtractError, match="2 models in the report, 1 checkpoints"):
        X.extract("jacobian", _analysis("jacobian", {}, ["a", "b"]), ["s"])
    with pytest.raises(X.ExtractError, match="no robust accuracy"):
        X.eval_metrics({"format": "advvit-eval/1", "clean_accuracy": 0.5,
                        "robust_accuracy": {"value": None}})


# ------------------------------------------------------------------------------------------
# The result file's schema
# ------------------------------------------------------------------------------------------

def _result(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path, seeds="[0, 1]"), defaults={})
    root = str(tmp_path / "root")
    run_experiment(exp, root, runner=_fake_runner([]), say=lambda s: None)
    return build_result(exp, root, "cmd")


def test_a_built_result_passes_its_schema_and_counts_the_seeds(tmp_path):
    data = _result(tmp_path)
    validate_result(data)
    assert data["summaries"]["pgd.robust@wd05"]["values"] == [0.3, 0.3]
    # 0.30 against 0.25 on both seeds: no spread at all, a clear 5-point difference.
    assert data["verdict"] == V.HOLDS and data["tests"][0]["difference"] == pytest.approx(0.05)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("verdict"), "missing 'verdict'"),
    (lambda d: d.update(verdict="probably"), "finding.verdict"),
    (lambda d: d.update(claim="one"), "finding.claim: expected int"),
    (lambda d: d["tests"][0].update(verdict="maybe"), r"tests\[0\].verdict"),
    (lambda d: d["summaries"]["pgd.robust@wd05"].update(n=3), "3"),
    (lambda d: d.update(format="other/1"), "finding.format"),
])
def test_the_schema_rejects_broken_results(tmp_path, mutate, message):
    data = _result(tmp_path)
    mutate(data)
    with pytest.raises(SchemaError, match=message):
        validate_result(data)


def _with_tests(path, tests):
    raw = yaml.safe_load(open(path))
    raw["tests"] = tests
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    return path


def test_a_value_clearly_under_a_below_threshold_holds_whatever_the_min_effect(tmp_path):
    # 0.25 +- 0 against 0.255: under the threshold beyond any noise. The experiment's
    # min_effect (0.01) is for greater tests; on top of a threshold it turned this into
    # "does not hold".
    path = _with_tests(_tiny_experiment(tmp_path, seeds="[0, 1]"),
                       [{"name": "low", "kind": "below", "value": "pgd.robust@wd0",
                         "threshold": 0.255}])
    exp = load_experiment(path, defaults={"min_effect": 0.01})
    assert exp.tests[0].min_effect == 0.0
    root = str(tmp_path / "root")
    run_experiment(exp, root, runner=_fake_runner([]), say=lambda s: None)
    data = build_result(exp, root, "cmd")
    assert data["tests"][0]["verdict"] == V.HOLDS and data["verdict"] == V.HOLDS


def test_a_min_effect_on_a_threshold_test_is_refused(tmp_path):
    path = _with_tests(_tiny_experiment(tmp_path),
                       [{"kind": "below", "value": "pgd.robust@wd0", "threshold": 0.1,
                         "min_effect": 0.02}])
    with pytest.raises(FindingsError, match=re.escape("key 'tests[0].min_effect'")):
        load_experiment(path, defaults={})


def test_an_undefined_metric_makes_a_test_cannot_tell_and_the_record_strict_json(tmp_path):
    # A metric averaged over nothing is NaN (transfer with no fooled example, a lesion kind no
    # block has); it used to abort the whole report inside summarize.
    exp = load_experiment(_tiny_experiment(tmp_path, seeds="[0, 1]"), defaults={})
    root = str(tmp_path / "root")
    run_experiment(exp, root, say=lambda s: None, runner=_fake_runner(
        [], robust=lambda u: float("nan") if u.key == "eval pgd wd0 s1" else 0.3))
    data = build_result(exp, root, "cmd")
    assert data["verdict"] == V.CANNOT_TELL and data["complete"]
    assert data["tests"][0]["verdict"] == V.CANNOT_TELL
    assert "pgd.robust@wd0 is undefined on seeds [1]" in data["tests"][0]["why"]
    assert "pgd.robust@wd0" not in data["summaries"] and "pgd.robust@wd05" in data["summaries"]
    path = write_result(data, str(tmp_path / "docs"))
    def no_nan(name):
        raise AssertionError(f"{name} in a findings record")
    saved = json.loads(open(path).read(), parse_constant=no_nan)
    validate_result(saved)
    assert [m["metrics"]["robust"] for m in saved["measurements"]
            if m["setting"] == "wd0"] == [0.3, None]


def test_missing_seeds_make_a_test_not_run(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path, seeds="[0, 1]"), defaults={})
    data = build_result(exp, str(tmp_path / "nothing"), "cmd")
    validate_result(data)
    assert data["verdict"] == "not run" and not data["complete"]
    assert data["tests"][0]["verdict"] == "not run"


def test_experiments_run_in_the_order_asked_and_claim_numbers_select_all_of_a_claim():
    ids = [e.id for e in load_experiments(SHIPPED, ["09_block_sensitivity", "1", "02_eps_warmup"])]
    assert ids == ["09_block_sensitivity", "01_cait", "01_deit", "01_resnet", "02_eps_warmup"]


def test_run_skips_an_experiment_that_waits_for_something(tmp_path, capsys):
    _tiny_experiment(tmp_path, extra="waits_for: a data set")
    assert findings_main(["run", "--configs", str(tmp_path / "exp"), "--yes",
                          "--root", str(tmp_path / "root")]) == 0
    assert "skipped, waits for a data set" in capsys.readouterr().out
    assert not (tmp_path / "root").exists()


def test_report_writes_records_and_the_page_and_keeps_a_fuller_record(tmp_path, capsys):
    _tiny_experiment(tmp_path, seeds="[0, 1]")
    exp = load_experiments(str(tmp_path / "exp"))[0]
    root, docs = tmp_path / "root", tmp_path / "docs" / "findings"
    run_experiment(exp, str(root), runner=_fake_runner([]), say=lambda s: None)
    args = ["report", "--configs", str(tmp_path / "exp"), "--root", str(root),
            "--results", str(docs)]
    assert findings_main(args) == 0
    page = (tmp_path / "docs" / "findings.md").read_text()
    assert "## Claim 99: weight decay 0.5 beats 0 on a tiny run" in page
    assert "**Verdict: holds.**" in page and "| `pgd.robust@wd05` | 0.3000 +- 0.0000" in page
    assert "![claim 99](findings/t1_tiny.png)" in page
    before = json.load(open(docs / "t1_tiny.json"))
    # A checkout without the runs judges the record's own measurements anew (here: with notes
    # added and the test turned around) instead of writing an empty record.
    spec = tmp_path / "exp" / "t1_tiny.yaml"
    spec.write_text(spec.read_text().replace("higher: pgd.robust@wd05, lower: pgd.robust@wd0",
                                             "higher: pgd.robust@wd0, lower: pgd.robust@wd05")
                    + "notes: written later\n")
    assert findings_main([*args[:-4], "--root", str(tmp_path / "empty"), "--results",
                          str(docs)]) == 0
    assert "judged anew from the 4 measurements" in capsys.readouterr().out
    after = json.load(open(docs / "t1_tiny.json"))
    validate_result(after)
    assert after["measurements"] == before["measurements"]
    assert after["summaries"] == before["summaries"]
    assert after["train_seconds"] == before["train_seconds"] and after["train_seconds"]
    assert after["notes"] == "written later" and after["verdict"] == V.DOES_NOT_HOLD
    assert after["tests"][0]["difference"] == pytest.approx(-before["tests"][0]["difference"])


def test_a_preparation_runs_first_and_only_while_what_it_creates_is_missing(tmp_path):
    script = tmp_path / "make.py"
    script.write_text("import pathlib, sys\npathlib.Path(sys.argv[1]).write_text('data')\n")
    made = tmp_path / "data" / "ready.txt"
    made.parent.mkdir()
    extra = f"prepare: {{args: [{script}, {made}], creates: {made}}}"
    exp = load_experiment(_tiny_experiment(tmp_path, extra=extra), defaults={})
    prep = units(exp, str(tmp_path / "root"))[0]
    assert prep.kind == "prepare" and status(prep) == "pending"
    run_unit(prep)
    assert made.read_text() == "data" and status(prep) == "done"
    calls = []
    run_experiment(exp, str(tmp_path / "root"), runner=_fake_runner(calls), say=lambda s: None)
    assert calls[0] == "train wd0 s0"


def test_a_preparation_that_creates_nothing_fails(tmp_path):
    script = tmp_path / "noop.py"
    script.write_text("")
    extra = f"prepare: {{args: [{script}], creates: {tmp_path / 'never.txt'}}}"
    exp = load_experiment(_tiny_experiment(tmp_path, extra=extra), defaults={})
    with pytest.raises(RunFailed, match="prepare noop.py failed"):
        run_unit(units(exp, str(tmp_path / "root"))[0])


def _misspell_option(raw):
    args = raw["evals"]["pgd"]["args"]
    args[args.index("--n-examples")] = "--n-exampels"


def _unknown_model(raw):
    raw["settings"]["wd05"]["train"]["model"] = "xcit_nano_12_p8_33"


def _finetune_behind_other_statistics(raw):
    raw["settings"]["wd05"]["finetune_from"] = "wd0"
    raw["settings"]["wd05"]["train"]["normalize"] = "imagenet"


@pytest.mark.parametrize("spoil, key, detail", [
    (_misspell_option, "evals.pgd.args", "--n-exampels"),
    (_unknown_model, "settings.wd05.train", "config key 'model'"),
    # Known only from the source's checkpoint at run time, after the source has trained.
    (_finetune_behind_other_statistics, "settings.wd05.train", "config key 'normalize'"),
])
def test_bad_commands_are_refused_before_anything_runs(tmp_path, capsys, spoil, key, detail):
    path = _tiny_experiment(tmp_path)
    raw = yaml.safe_load(open(path))
    spoil(raw)
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    root = tmp_path / "root"
    assert findings_main(["run", "--configs", str(tmp_path / "exp"), "--root", str(root),
                          "--yes"]) == 2
    err = capsys.readouterr().err
    assert f"key '{key}'" in err and detail in err
    assert not root.exists()


def test_a_finetuned_setting_that_takes_its_sources_statistics_passes_the_checks(tmp_path):
    from advvit.findings.runner import check_configs
    raw = yaml.safe_load(open(_tiny_experiment(tmp_path)))
    _finetune_behind_other_statistics(raw)
    raw["settings"]["wd0"]["train"]["normalize"] = "dataset"
    for normalize in ("none", "dataset"):
        raw["settings"]["wd05"]["train"]["normalize"] = normalize
        path = tmp_path / "exp" / "t1_tiny.yaml"
        path.write_text(yaml.safe_dump(raw))
        check_configs(load_experiment(str(path), defaults={}), str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()


def test_the_test_sets_sampling_noise_widens_the_band():
    # Seeds agree to 0.1 point, but 100 test examples leave ~5 points of sampling noise.
    hi, lo = [0.600, 0.601], [0.550, 0.551]
    assert V.greater("t", S(hi, [10 ** 6] * 2), S(lo, [10 ** 6] * 2),
                     min_effect=0.01).verdict == V.HOLDS
    small = V.greater("t", S(hi, [100, 100]), S(lo, [100, 100]), min_effect=0.01)
    assert small.verdict == V.CANNOT_TELL
    s = S([0.5, 0.5], [100, 100])
    assert s.sampling_var == pytest.approx(0.25 / 100)
    # The seeds share the test images: more of them leave the sampling term as it is.
    assert S([0.5] * 6, [100] * 6).sampling_var == pytest.approx(0.25 / 100)
    with pytest.raises(ValueError, match="one positive example count per value"):
        S([0.5, 0.5], [100])


def test_created_is_when_the_measurements_were_made_not_when_reported(tmp_path):
    def dated(unit, **kw):
        fake(unit, **kw)
        if unit.kind == "eval":
            with open(unit.output) as fh:
                report = json.load(fh)
            report["created"] = f"2026-01-0{unit.seed + 1}T00:00:00+00:00"
            with open(unit.output, "w") as fh:
                json.dump(report, fh)
        return 1.0
    fake = _per_example_runner()
    exp, data = _built(tmp_path, dated, seeds="[0, 1]")
    assert data["created"] == "2026-01-02T00:00:00+00:00"
    assert rebuild_result(exp, data, "cmd")["created"] == data["created"]


def test_an_evaluation_of_the_last_checkpoint_reads_last_pth(tmp_path):
    path = _tiny_experiment(tmp_path)
    spec = yaml.safe_load(open(path))
    spec["evals"]["pgd_last"] = {**spec["evals"]["pgd"], "checkpoint": "last"}

    def load(spec):
        with open(path, "w") as fh:
            yaml.safe_dump(spec, fh)
        return load_experiment(path, defaults={})
    by = {u.source: u for u in units(load(spec), "r") if u.kind == "eval"}
    assert by["pgd"].checkpoints[0].endswith("best.pth")
    assert by["pgd_last"].checkpoints[0].endswith("last.pth")
    command = by["pgd_last"].command
    assert command[command.index("--checkpoint") + 1] == by["pgd_last"].checkpoints[0]
    assert by["pgd"].output != by["pgd_last"].output
    spec["evals"]["pgd_last"]["checkpoint"] = "final"
    with pytest.raises(FindingsError, match=r"evals.pgd_last.checkpoint.*best .*or last"):
        load(spec)


def test_a_record_keeps_each_evaluations_example_count(tmp_path):
    data = _result(tmp_path)
    evals = [m for m in data["measurements"] if m["source"] == "pgd"]
    assert evals and all(m["n_examples"] == 10 ** 6 for m in evals)
    assert all("#examples" not in m["metrics"] for m in evals)
    assert data["summaries"]["pgd.robust@wd05"]["sampling_var"] == pytest.approx(
        0.3 * 0.7 / 10 ** 6)


@pytest.mark.slow
def test_sigterm_stops_the_runner_and_its_running_unit(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    _tiny_experiment(tmp_path)
    raw = yaml.safe_load(open(tmp_path / "train.yaml"))
    raw.update(max_steps_per_epoch=400, log_interval=1)   # long enough to be caught running
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    root = tmp_path / "root"
    # SIGINT ignored, as a shell leaves it for a background job: SIGTERM must still work.
    proc = subprocess.Popen(
        [sys.executable, "-m", "advvit.findings", "run", "--yes", "--configs",
         str(tmp_path / "exp"), "--root", str(root)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    exp = load_experiments(str(tmp_path / "exp"))[0]
    train = units(exp, str(root))[0]
    log = os.path.join(train.folder, "findings_train.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.isfile(log) and "step" in open(log).read()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run again to resume" in err
    assert not os.path.exists(train.output)
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", train.command[3]], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the training process outlived the runner"


def test_a_run_killed_before_its_first_checkpoint_is_set_aside_not_deleted(tmp_path):
    from advvit.findings.runner import set_aside_leftovers
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    train = units(exp, str(tmp_path / "root"))[0]
    assert set_aside_leftovers(train) is None                  # no folder yet
    os.makedirs(train.folder)
    (tmp_path / "root" / "runs" / os.path.basename(train.folder) / "args.yaml").write_text("a: 1\n")
    aside = set_aside_leftovers(train)
    assert aside and not os.path.exists(train.folder)
    assert open(os.path.join(aside, "args.yaml")).read() == "a: 1\n"
    os.makedirs(train.folder)
    open(os.path.join(train.folder, "recovery.pth"), "wb").close()
    assert status(train) == "partial" and set_aside_leftovers(train) is None   # resumable: kept


def test_a_run_folder_whose_lock_is_held_is_left_alone(tmp_path):
    from advvit import rundir
    from advvit.findings.runner import set_aside_leftovers
    exp = load_experiment(_tiny_experiment(tmp_path), defaults={})
    train = units(exp, str(tmp_path / "root"))[0]
    lock = rundir.acquire(train.folder)          # a run training there right now
    try:
        (tmp_path / "root" / "runs" / os.path.basename(train.folder) / "args.yaml").write_text("")
        assert set_aside_leftovers(train) is None and os.path.isdir(train.folder)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------
# Paired outcomes, masking and the design in the record
# ------------------------------------------------------------------------------------------

def _per_example_runner(masked_key=None):
    """Evaluations of 200 images with per-example outcomes: wd05 right on the first 120, wd0 on
    the first 100 (so they differ on 20 images only); ``masked_key`` warns of masking."""
    def run(unit, **_):
        os.makedirs(os.path.dirname(unit.output), exist_ok=True)
        payload = {"seconds": 1.0}
        if unit.kind == "eval":
            assert "--per-example" in unit.command
            right = 120 + unit.seed if unit.setting == "wd05" else 100
            rows = [{"index": i, "label": 0, "clean": True, "robust": i < right,
                     "broken_by": None} for i in range(200)]
            payload = {"format": "advvit-eval/1", "clean_accuracy": 1.0, "n": 200,
                       "robust_accuracy": {"value": right / 200}, "per_example": rows,
                       "headline": None}
            if unit.key == masked_key:
                payload["headline"] = {"code": "gradient_masking", "flags": ["zero_gradients"]}
        with open(unit.output, "w") as fh:
            json.dump(payload, fh)
        return 1.0
    return run


def _built(tmp_path, runner, seeds="[0, 1, 2]", extra=""):
    exp = load_experiment(_tiny_experiment(tmp_path, seeds=seeds, extra=extra), defaults={})
    root = str(tmp_path / "root")
    run_experiment(exp, root, runner=runner, say=lambda s: None)
    return exp, build_result(exp, root, "cmd")


def test_per_example_outcomes_are_packed_and_pair_the_test(tmp_path):
    exp, data = _built(tmp_path, _per_example_runner())
    m = next(m for m in data["measurements"] if m["setting"] == "wd05")
    assert m["outcomes"]["indices"] == {"start": 0} and m["masking"] == []
    indices, bits = X.unpack_outcomes(m["outcomes"], "robust")
    assert indices == list(range(200)) and bits.sum() == 120
    t = data["tests"][0]
    assert t["paired"] and [s["b"] for s in t["mcnemar"]] == [20, 21, 22]
    assert t["verdict"] == V.HOLDS and not any("per-example" in g for g in data["gaps"])
    # The same numbers without the outcomes: the unpaired rule, and the record says so.
    old = json.loads(json.dumps(data))
    for m in old["measurements"]:
        del m["outcomes"], m["masking"]
    again = rebuild_result(exp, old, "cmd")
    assert not again["tests"][0]["paired"] and again["tests"][0]["se"] > t["se"]
    assert any("no per-example outcomes for robust" in g for g in again["gaps"])
    assert any("gradient-masking checks are not in the record" in g for g in again["gaps"])
    assert again["created"] == old["created"]


def test_a_masked_evaluation_makes_the_verdict_untrustworthy(tmp_path):
    _, data = _built(tmp_path, _per_example_runner(masked_key="eval pgd wd0 s1"))
    assert data["verdict"] == V.UNTRUSTWORTHY
    assert "pgd.robust@wd0 seed 1 (zero_gradients)" in data["tests"][0]["why"]
    validate_result(data)


def test_the_design_records_added_seeds_and_an_unreached_premise(tmp_path):
    _, data = _built(tmp_path, _per_example_runner(), extra=(
        "seeds_added_after_looking: [2]\n"
        "        premise_not_reached: the collapse never happened"))
    assert data["seeds_added_after_looking"] == [2] and data["alpha"] == 0.05
    assert data["verdict"] == V.CANNOT_TELL and data["tests_verdict"] == V.HOLDS
    page = render([data])
    assert "cannot tell: premise not reached" in page and "Seeds added after looking" in page
    with pytest.raises(FindingsError, match="seeds_added_after_looking"):
        load_experiment(_tiny_experiment(tmp_path, seeds="[0, 1]",
                                         extra="seeds_added_after_looking: [5]"), defaults={})


@pytest.mark.parametrize("premise, verdict", [("robust", V.DOES_NOT_HOLD),
                                              ("collapse", V.CANNOT_TELL)])
def test_a_premise_test_that_does_not_hold_leaves_the_claim_undecided(tmp_path, premise, verdict):
    path = _tiny_experiment(tmp_path, seeds="[0, 1, 2]")
    raw = yaml.safe_load(open(path))
    # wd0's robust accuracy is 0.5 on every seed: far above a 5% collapse.
    raw["tests"].append({"name": "collapse", "kind": "below", "value": "pgd.robust@wd0",
                         "threshold": 0.05})
    raw["premise"] = [premise]
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    exp = load_experiment(path, defaults={})
    root = str(tmp_path / "root")
    run_experiment(exp, root, runner=_per_example_runner(), say=lambda s: None)
    data = build_result(exp, root, "cmd")
    assert [t["verdict"] for t in data["tests"]] == [V.HOLDS, V.DOES_NOT_HOLD]
    assert data["verdict"] == verdict
    if premise == "collapse":
        assert data["verdict_note"] == "premise not reached"
        assert data["premise_not_reached"] == "premise tests: collapse does not hold"
        assert data["tests_verdict"] == V.DOES_NOT_HOLD
    raw["premise"] = ["colapse"]
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    with pytest.raises(FindingsError, match=r"premise.*known: robust, collapse"):
        load_experiment(path, defaults={})


def test_the_page_adjusts_over_the_suite_and_names_shared_runs(tmp_path):
    _, data = _built(tmp_path, _per_example_runner())
    other = json.loads(json.dumps(data))
    other.update(id="t2_other")
    holm = suite_holm([data, other])
    p = data["tests"][0]["p"]
    assert holm[("t1_tiny", "robust")] == pytest.approx(min(1.0, 2 * p))
    assert shared_runs([data, other]) == [("t1_tiny", "t2_other", 6)]


def test_the_shipped_page_is_rendered_from_the_shipped_records():
    records = [json.load(open(os.path.join(ROOT, "docs", "findings", f"{e.id}.json")))
               for e in load_experiments(SHIPPED)]
    for record in records:
        validate_result(record)
    assert render(records) == open(os.path.join(ROOT, "docs", "findings.md")).read()


def test_verify_measures_one_unit_again_and_names_what_differs(tmp_path):
    exp, data = _built(tmp_path, _per_example_runner())
    index = next(i for i, m in enumerate(data["measurements"])
                 if (m["setting"], m["seed"]) == ("wd05", 1))
    root = str(tmp_path / "verify")
    key = measurement_unit(exp, data, index, root)
    assert key == "eval pgd wd05 s1"
    calls = []

    def counted(unit, **kw):
        calls.append(unit.key)
        return _per_example_runner()(unit, **kw)
    run_experiment(exp, root, runner=counted, say=lambda s: None, only=[key])
    assert calls == ["train wd05 s1", "eval pgd wd05 s1"]
    assert compare_measurement(exp, data, index, root) == (True, [])
    # Measured again with three more images right: inside the record's band (the seeds differ
    # by a point, 200 images leave 3.4 points), and the outcomes that changed are counted.
    def better(unit, **kw):
        counted(unit, **kw)
        if unit.kind != "eval":
            return 1.0
        report = json.load(open(unit.output))
        for row in report["per_example"][121:124]:
            row["robust"] = True
        report["robust_accuracy"]["value"] += 3 / 200
        json.dump(report, open(unit.output, "w"))
        return 1.0
    other = str(tmp_path / "verify2")
    run_experiment(exp, other, runner=better, say=lambda s: None, only=[key])
    ok, lines = compare_measurement(exp, data, index, other)
    assert ok and "within the record's band" in lines[0]
    assert lines[1] == "pgd.robust@wd05 seed 1: 3 images changed outcome"
