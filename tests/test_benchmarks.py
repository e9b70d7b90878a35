"""Smoke tests of the benchmark scripts: each runs for a step or two on a tiny model and writes
well-formed results. No timing is asserted."""
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_contention  # noqa: E402
import bench_eval_precision  # noqa: E402
import bench_gpu_throughput  # noqa: E402
import bench_train_step  # noqa: E402
import check_reproducibility as repro  # noqa: E402

TINY = ["--img-size", "32", "--num-classes", "10", "--threads", "2"]


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_train_step_benchmark_writes_timings_ratios_and_tables(tmp_path):
    out, md = tmp_path / "train.json", tmp_path / "train.md"
    bench_train_step.main(["--models", "xcit_nano_12_p16_224", "--batch", "4", "--rounds", "1",
                           "--warmup", "0", "--cases", "clean,fgsm-rs,pgd-2", "--no-memory",
                           "--output", str(out), "--markdown", str(md), *TINY])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "train_step"
    for key in ("date_utc", "cpu", "torch", "timm", "python", "command"):
        assert payload["env"][key]
    rows = {(r["case"], r["variant"]): r for r in payload["timing"]}
    expected = {("clean", "advvit"), ("clean", "floor")}
    for case in ("fgsm-rs", "pgd-2"):
        expected |= {(case, "advvit"), (case, "floor"), (case, "thesis")}
        if payload["env"]["torchattacks"]:
            expected.add((case, "torchattacks"))
    assert set(rows) == expected
    for r in rows.values():
        assert _positive(r["median_s"]) and _positive(r["images_per_s"])
        assert _positive(r["ratio_to_floor"]) and len(r["samples_s"]) == 1
    assert rows[("fgsm-rs", "floor")]["ratio_to_floor"] == 1.0
    if not payload["env"]["torchattacks"]:
        assert any("torchattacks" in n for n in payload["notes"])
    text = md.read_text()
    assert "advvit / floor" in text and "| fgsm-rs |" in text


@pytest.mark.slow
def test_train_step_benchmark_memory_runs_in_a_fresh_process(tmp_path):
    out = tmp_path / "mem.json"
    bench_train_step.main(["--models", "xcit_nano_12_p16_224", "--batch", "4", "--no-timing",
                           "--cases", "fgsm-rs", "--variants", "advvit", "--output", str(out),
                           *TINY])
    payload = json.loads(out.read_text())
    assert payload["timing"] == []
    (rec,) = payload["memory"]
    assert rec["model"] == "xcit_nano_12_p16_224" and rec["variant"] == "advvit"
    assert "error" not in rec, rec
    assert math.isfinite(rec["peak_mib"]) and rec["peak_mib"] >= 0
    assert "RSS" in rec["method"]


def test_throughput_benchmark_runs_on_cpu_with_tiny_settings(tmp_path):
    out, md = tmp_path / "tp.json", tmp_path / "tp.md"
    variants = "attack:eager,fgsm-rs:eager+fused+cl"
    bench_gpu_throughput.main(["--device", "cpu", "--model", "xcit_nano_12_p16_224",
                               "--img-size", "32", "--batch", "8", "--steps", "1", "--rounds", "1",
                               "--warmup", "1", "--num-classes", "10", "--variants", variants,
                               "--output", str(out), "--markdown", str(md)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "gpu_throughput"
    assert payload["settings"]["amp"] == "bf16"
    assert [r["variant"] for r in payload["results"]] == variants.split(",")
    for r in payload["results"]:
        assert _positive(r["images_per_s"]) and _positive(r["median_s"])
        assert len(r["samples_s"]) == 1
    assert payload["compile_stats"]["graphs_added_while_timing"] == 0
    assert payload["eval_precision"] is None  # the evaluation section: CUDA or asked for
    assert "images/s" in md.read_text()


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained timm test ViT for Fashion-MNIST at 32x32, as an advvit checkpoint."""
    import torch
    from advvit import checkpoint as C
    from advvit.models import create_model
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST}")
    torch.manual_seed(0)
    norm = ((0.2860,), (0.3530,))
    model = create_model("test_vit", num_classes=10, in_chans=1, img_size=32, normalize=norm)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    C.save_checkpoint(path, C.make_checkpoint(
        model, C.ModelSpec("test_vit", 10, 1, 32, norm), epoch=0, step=0, train_norm="linf",
        train_eps=0.0, config={"dataset": "fashion_mnist", "data_dir": str(FMNIST)}))
    return path


def _check_precision_rows(part, variants, n):
    assert part["n"] == n and 0.0 <= part["clean_accuracy"] <= 1.0
    rows = {r["variant"]: r for r in part["rows"]}
    assert list(rows) == variants
    assert rows["fp32"]["robust_here_only"] == rows["fp32"]["broken_here_only"] == 0
    assert rows["raw"]["ratio_to_raw"] == 1.0
    for r in rows.values():
        assert _positive(r["seconds_per_example"]) and _positive(r["ratio_to_raw"])
        assert len(r["robust"]) == n and 0.0 <= r["robust_accuracy"] <= 1.0
        assert r["robust_here_only"] + r["broken_here_only"] <= n
    return rows


def test_eval_precision_benchmark_writes_rows_agreement_and_table(tiny_checkpoint, tmp_path):
    out, md = tmp_path / "p.json", tmp_path / "p.md"
    payload = bench_eval_precision.main([
        "--checkpoint", str(tiny_checkpoint), "--n-examples", "6", "--aa-n-examples", "4",
        "--apgd-steps", "2", "--variants", "raw,bf16", "--threads", "1",
        "--output", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text())["benchmark"] == "eval_precision"
    for key in ("date_utc", "cpu", "torch", "command"):
        assert payload["env"][key]
    _check_precision_rows(payload["parts"]["apgd-ce"], ["fp32", "bf16", "raw"], 6)
    _check_precision_rows(payload["parts"]["autoattack"], ["fp32", "bf16", "raw"], 4)
    text = md.read_text()
    assert "| apgd-ce | 6 | bf16 |" in text and "vs raw AutoAttack" in text
    with pytest.raises(SystemExit, match="unknown variants"):
        bench_eval_precision.parse_variants("fp32,fp8")


@pytest.mark.slow
def test_throughput_benchmarks_evaluation_section_runs_on_cpu(tmp_path):
    # The section CUDA runs by default, here on the CPU and a tiny model: bf16 beside fp32
    # eager and raw AutoAttack, on inputs labelled by the model itself. Compiling costs minutes
    # on this CPU; the compiled path is test_cli_eval's.
    payload = bench_gpu_throughput.main([
        "--device", "cpu", "--model", "xcit_nano_12_p16_224", "--img-size", "32", "--batch", "4",
        "--steps", "1", "--rounds", "1", "--warmup", "0", "--num-classes", "10",
        "--variants", "attack:eager", "--eval-variants", "fp32,bf16,raw",
        "--eval-n", "4", "--eval-batch", "4", "--eval-steps", "2"])
    part = payload["eval_precision"]["parts"]["apgd-ce"]
    rows = _check_precision_rows(part, ["fp32", "bf16", "raw"], 4)
    assert part["clean_accuracy"] == 1.0 and rows["bf16"]["ratio_to_raw"] > 0


def test_bad_variant_names_are_refused():
    with pytest.raises(SystemExit):
        bench_gpu_throughput.parse_variant("fgsm-rs:turbo")
    with pytest.raises(SystemExit):
        bench_train_step.main(["--cases", "pgd-3", "--no-memory"])


@pytest.mark.slow
def test_time_to_robustness_writes_rows_table_and_plot(tmp_path):
    import bench_time_to_robustness
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs the real Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    prefix = tmp_path / "ttr"
    assert bench_time_to_robustness.main(["--models", "resnet18_gelu", "--minutes", "0.001",
                                          "--chunk", "2", "--eval-batches", "1",
                                          "--output", str(prefix)]) == 0
    payload = json.loads(prefix.with_suffix(".json").read_text())
    rows = payload["rows"]
    assert rows and all(_positive(r["train_seconds"]) for r in rows)
    assert all(0.0 <= r["pgd_acc"] <= 1.0 and 0.0 <= r["clean_acc"] <= 1.0 for r in rows)
    assert prefix.with_suffix(".png").stat().st_size > 1000
    assert "| resnet18_gelu |" in prefix.with_suffix(".md").read_text()


@pytest.mark.slow
def test_train_step_benchmark_models_take_timm_arguments(tmp_path):
    assert bench_train_step.parse_model("deit_tiny_patch16_224:patch_size=4:qkv_bias=False") == (
        "deit_tiny_patch16_224", {"patch_size": 4, "qkv_bias": False})
    assert bench_train_step.parse_model("fan_tiny_12_p4_32") == ("fan_tiny_12_p4_32", {})
    with pytest.raises(SystemExit, match="key=value"):
        bench_train_step.parse_model("deit_tiny_patch16_224:patch_size")
    out = tmp_path / "opts.json"
    bench_train_step.main(["--models", "deit_tiny_patch16_224:patch_size=8:depth=1", "--batch", "2",
                           "--rounds", "1", "--warmup", "0", "--cases", "fgsm-rs", "--variants", "advvit",
                           "--output", str(out), *TINY])
    payload = json.loads(out.read_text())
    (row,) = payload["timing"]
    assert row["model"] == "deit_tiny_patch16_224:patch_size=8:depth=1" and _positive(row["median_s"])
    (mem,) = payload["memory"]
    assert "error" not in mem, mem


def test_train_step_benchmark_takes_grayscale_input(tmp_path):
    out = tmp_path / "gray.json"
    payload = bench_train_step.main([
        "--models", "xcit_nano_12_p8_224", "--in-chans", "1", "--batch", "2", "--rounds", "1",
        "--warmup", "0", "--cases", "fgsm-rs", "--variants", "advvit,floor", "--no-memory",
        "--output", str(out), *TINY])
    assert {r["variant"] for r in payload["timing"]} == {"advvit", "floor"}
    assert payload["settings"]["in_chans"] == 1


@pytest.mark.slow
def test_train_step_benchmark_times_compiled_beside_eager(tmp_path):
    payload = bench_train_step.main([
        "--models", "xcit_nano_12_p16_224", "--batch", "2", "--rounds", "1", "--warmup", "1",
        "--cases", "fgsm-rs", "--variants", "compiled,floor", "--no-memory", *TINY])
    rows = {r["variant"]: r for r in payload["timing"] if "case" in r}
    assert set(rows) == {"compiled", "floor"} and _positive(rows["compiled"]["ratio_to_floor"])
    counts = [r for r in payload["timing"] if "compile_counts" in r]
    assert counts and counts[0]["compile_counts"]["after"]["unique_graphs"] >= 1


def test_contention_grid_order_fair_share_and_table():
    cells = bench_contention.grid_cells([0, 1], [1, 2], ["default", "passive"], True)
    assert cells[:4] == [(0, 1, "default", 0), (0, 1, "passive", 0), (0, 2, "default", 0),
                         (0, 2, "passive", 0)]
    assert cells[4] == (1, 1, "passive", 0)  # the order rotates with k
    assert len(cells) == 12 and all(c[0] == 0 and c[3] == 1 for c in cells[8:])
    assert bench_contention.fair_share(100.0, 0, 2, 2) == 100.0
    assert bench_contention.fair_share(100.0, 1, 1, 2) == 100.0  # a core each
    assert bench_contention.fair_share(100.0, 2, 2, 2) == 50.0
    recs = [{"load": 0, "threads": 1, "policy": "default", "pass": 0, "images_per_s": 80.0,
             "median_step_s": 1.6, "cpu_per_wall": 1.0, "loadavg_before": [1.0, 1, 1]},
            {"load": 0, "threads": 2, "policy": "default", "pass": 0, "images_per_s": 100.0,
             "median_step_s": 1.3, "cpu_per_wall": 2.0, "loadavg_before": [1.0, 1, 1],
             "others_runnable": 1.0},
            {"load": 2, "threads": 2, "policy": "default", "pass": 0, "images_per_s": 10.0,
             "median_step_s": 13.0, "cpu_per_wall": 1.0, "loadavg_before": [3.0, 1, 1],
             "others_runnable": 4.0},
            {"load": 2, "threads": 1, "policy": "default", "pass": 0,
             "error": "timed out after 240 s", "loadavg_before": None}]
    bench_contention.add_ratios(recs, cores=2)
    assert recs[2]["fair_images_per_s"] == 50.0 and recs[2]["vs_fair"] == pytest.approx(0.2)
    assert recs[2]["vs_best_alone"] == pytest.approx(0.1) and recs[3]["vs_fair"] is None
    # 4 others: a third of the cores for 2 threads; the reference had 1 other: two thirds
    assert recs[2]["fair_measured_images_per_s"] == pytest.approx(100 / 3 / (2 / 3))
    assert recs[1]["vs_fair_measured"] == pytest.approx(1.0)
    assert recs[0]["vs_fair_measured"] is None  # no run-queue samples
    md = bench_contention.render_markdown({
        "settings": {"img_size": 32, "batch": 128, "eps": 0.1, "warmup": 3,
                     "warmup_seconds": 20.0, "seconds": 15.0},
        "env": {"usable_cores": 2}, "cells": recs})
    assert "| 2 | 2 | default | 10.0 | 13.00 | 0.20 | 4.0 | 0.20 | 0.10 | 1.00 |" in md
    assert "timed out after 240 s" in md


def test_reproducibility_capabilities_cells_flips_and_table(tmp_path):
    import numpy as np
    flags = repro.cpu_flags("processor : 0\nflags : fpu sse avx avx2 fma avx512f\n")
    assert {"avx2", "fma", "avx512f"} <= flags
    assert repro.available_capabilities(flags) == ["default", "avx2", "avx2-mkl"]  # no avx512bw
    assert repro.available_capabilities(flags | {"avx512bw", "avx512vl", "avx512dq"}) == [
        "default", "avx2", "avx512", "avx2-mkl"]
    assert repro.cell_env("avx2-mkl")["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    assert repro.grid([1, 2], ["default"], True) == [
        (1, "default", "t1_default"), (2, "default", "t2_default"),
        (1, "default", "t1_default_again")]
    cells = []
    for name, robust, shift in (("a", [1, 1, 0, 0], 0.0), ("b", [1, 0, 0, 1], 1e-6),
                                ("a_again", [1, 1, 0, 0], 0.0)):
        report = tmp_path / f"{name}.json"
        report.write_text(json.dumps({
            "clean_accuracy": 0.75, "robust_accuracy": {"value": sum(robust) / 4},
            "environment": {"torch_threads": 2, "cpu_capability": "AVX2"},
            "per_example": [{"index": 10 + i, "clean": i < 3, "robust": bool(r)}
                            for i, r in enumerate(robust)]}))
        probe = tmp_path / f"{name}.npz"
        np.savez(probe, logits=np.eye(4, dtype=np.float32) + shift,
                 grad=np.full((4, 1, 2, 2), -1e-7 + shift, dtype=np.float32),
                 capability="AVX2", threads=2)
        cells.append(repro.read_cell({"name": name, "threads": 2, "capability": "avx2",
                                      "report": str(report), "probe": str(probe),
                                      "seconds": 1.0}))
    repro.compare(cells)
    repro.compare_probes(cells)
    assert cells[1]["robust_flips"] == [11, 13] and cells[1]["clean_flips"] == []
    assert cells[2]["robust_flips"] == [] and cells[2]["logits_max_abs_diff"] == 0.0
    assert cells[1]["logits_max_abs_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert cells[1]["grad_sign_changes"] == 16 and cells[1]["argmax_changes"] == 0
    summary = repro.summarize(cells)
    assert summary["clean_accuracy"] == {"values_pct": [75.0], "same_everywhere": True,
                                         "spread_pct": 0.0}
    assert summary["robust_accuracy"]["values_pct"] == [50.0]  # same count, other examples
    assert summary["robust_flipped_examples"] == {"11": ["a", "a_again"], "13": ["b"]}
    md = repro.render_markdown({"cells": cells, "summary": summary})
    assert "| b | 2 | AVX2 | 75.00% | 50.00% | 0 | 2 | 11, 13 |" in md
    assert "| 11 | a, a_again |" in md
