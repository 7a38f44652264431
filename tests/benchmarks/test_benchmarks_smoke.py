"""Each benchmark's entry point runs end to end at tiny shapes and reports what its JSON promises.

No timing assertions: speed goals live in the benchmarks themselves, measured side by side.
"""

from __future__ import annotations

import json

from benchmarks import moe_dispatch, moe_layer


def _positive_float(v) -> bool:
    return isinstance(v, float) and v > 0


def test_moe_layer_smoke(capsys):
    res = moe_layer.main(["--tokens", "64", "--repeats", "1", "--warmup", "0", "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads(json.dumps(res))  # stdout is the JSON result, nothing else
    assert "moe_over_dense" in captured.err  # the table went to stderr
    assert _positive_float(res["moe_over_dense"])
    for k in ("median_ms", "shape", "torch", "threads", "dispatch", "hf_over_moe"):
        assert k in res
    assert set(res["median_ms"]) >= {"moe", "dense"}
    assert all(_positive_float(v) for v in res["median_ms"].values())
    if res["hf_over_moe"] is not None:  # transformers installed: the outputs were compared before timing
        assert _positive_float(res["hf_over_moe"])
        assert res["hf_max_abs_diff"] < 1e-4


def test_moe_layer_forced_dispatch_variant():
    res = moe_layer.run(tokens=32, seq_len=16, repeats=1, warmup=0, hf=False, dispatches=("padded_bmm",))
    assert res["hf_over_moe"] is None
    assert res["shape"]["batch"] == 2
    assert _positive_float(res["median_ms"]["moe:padded_bmm"])


def test_moe_dispatch_smoke(capsys):
    moe_dispatch.main(["--tokens", "64", "--repeats", "1", "--warmup", "0", "--json"])
    res = json.loads(capsys.readouterr().out)  # stdout is the JSON result, nothing else
    assert set(res["median_ms"]) == {"fused_loop", "grouped_mm", "padded_bmm", "loop"}
    assert all(_positive_float(v) for v in res["median_ms"].values())
    for k in ("grouped_over_loop", "padded_over_loop", "fused_over_loop"):
        assert _positive_float(res[k])


def test_gpu_check_on_cpu_checks_what_it_can(capsys):
    """Without CUDA: the grouped_mm probe and every dispatch against the loop run on the CPU and pass, the
    CUDA rows are SKIP; stdout holds only the JSON report (the table goes to stderr)."""
    import torch

    from benchmarks import gpu_check

    if torch.cuda.is_available():
        import pytest

        pytest.skip("on a GPU machine this is the full check: run python -m benchmarks.gpu_check")
    assert gpu_check.main(["--no-train"]) == 0
    captured = capsys.readouterr()
    rep = json.loads(captured.out)
    assert rep["ok"] and not rep["cuda"]
    status = {(r["check"], r["where"]): r["status"] for r in rep["rows"]}
    assert status[("experts", "cpu fp32 fused_loop")] == "PASS"
    assert status[("experts", "cpu bf16 padded_bmm")] == "PASS"
    assert {s for (c, w), s in status.items() if w == "cuda"} == {"SKIP"}
    assert "PASS" in captured.err and "FAIL" in captured.err  # the table's summary line
