"""Smoke tests of scripts/bench_eval_overhead.py and scripts/bench_xla_steps.py: each runs at its
tiniest size and writes well-formed JSON. No timing is asserted. The XLA benchmark runs only
where torch_xla imports (the project's .venv-xla); elsewhere it must report the skip cleanly."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_xla_steps  # noqa: E402  (standard library only at import time)

HAS_XLA = importlib.util.find_spec("torch_xla") is not None


def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_eval_overhead_benchmark_writes_json(tmp_path):
    pytest.importorskip("pyautoattack")
    import bench_eval_overhead
    from advvit import data as advdata
    try:
        advdata.create_dataset("fashion_mnist", split="val")
    except advdata.DataNotFoundError as err:
        pytest.skip(f"Fashion-MNIST is not installed: {err}")
    out, md = tmp_path / "eval.json", tmp_path / "eval.md"
    # eps 0.5 breaks a barely trained model in APGD-CE, so the standard ensemble stays cheap.
    bench_eval_overhead.main([
        "--train-seconds", "0.1", "--train-batch", "16", "--n-examples", "2", "--eps", "0.5",
        "--rounds", "1", "--standard-rounds", "1", "--cli-rounds", "1", "--warmup", "0",
        "--cli-attacks", "apgd-ce", "--save-checkpoint", str(tmp_path / "m.pth"),
        "--output", str(out), "--markdown", str(md)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "eval_overhead"
    for key in ("date_utc", "cpu", "torch", "timm", "pyautoattack", "command"):
        assert payload["env"][key]
    assert payload["training"]["steps"] >= 1
    for part in ("apgd-ce", "standard"):
        rows = {r["variant"]: r for r in payload["parts"][part]["rows"]}
        assert set(rows) == {"direct", "adapter", "run_attack"}
        assert rows["direct"]["ratio_to_direct"] == 1.0
        for r in rows.values():
            assert _positive(r["median_s"]) and _positive(r["ratio_to_direct"])
            assert len(r["samples_s"]) == 1
            assert r["agrees_with_direct"] is True
            assert 0.0 <= r["robust_accuracy"] <= 1.0
    (cli,) = payload["parts"]["cli"]["rows"]
    assert cli["attack"] == "apgd-ce"
    assert _positive(cli["median_wall_s"]) and cli["median_wall_s"] >= cli["median_attack_s"]
    assert "advvit.eval" in cli["command"]
    assert "/ direct" in md.read_text()


@pytest.mark.skipif(HAS_XLA, reason="checks the behaviour without torch_xla")
def test_xla_benchmark_reports_a_clean_skip_without_torch_xla(tmp_path):
    out = tmp_path / "xla.json"
    assert bench_xla_steps.main(["--steps", "1", "--output", str(out)]) == bench_xla_steps.SKIP_EXIT
    assert "torch_xla" in json.loads(out.read_text())["skipped"]


@pytest.mark.skipif(not HAS_XLA, reason="torch_xla is not installed here (run in .venv-xla)")
def test_xla_benchmark_writes_json(tmp_path):
    out, md = tmp_path / "xla.json", tmp_path / "xla.md"
    rc = bench_xla_steps.main(["--cases", "fgsm", "--steps", "2", "--batch", "2", "--img-size",
                               "32", "--log-interval", "2", "--output", str(out),
                               "--markdown", str(md)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "xla_steps"
    assert payload["env"]["torch_xla"] and payload["env"]["PJRT_DEVICE"]
    (case,) = payload["cases"]
    assert case["case"] == "fgsm" and [r["step"] for r in case["rows"]] == [1, 2]
    for r in case["rows"]:
        assert _positive(r["wall_s"]) and r["barriers"] == 1
        assert r["executed"] >= 2  # one attack graph and one update graph at least
    assert case["rows"][0]["compiles"] > 0
    assert case["rows"][-1]["compiles_cum"] == case["compiles_total"]
    assert "compiles (cum.)" in md.read_text()
