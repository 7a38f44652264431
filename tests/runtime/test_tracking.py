"""Run tracking (``--log``): the trainer's curves reach TensorBoard, W&B and MLflow through the libraries
themselves, offline, and read back as they were logged in metrics.jsonl.

Each library is an optional extra: its test skips when it is not installed (CI installs the dev extra only).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from moeforge.compiler import account, build
from moeforge.runtime import MissingTracker, Tracking, TrainConfig, check_trackers, train
from moeforge.runtime._tracking import scalars

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PARAMS = {"moe.top_k": 2, "lr": 0.003, "granularity": 4}
CURVES = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "load/max_cv", "eval/val_loss"}


def test_scalars_name_the_curves():
    train_line = {
        "kind": "train",
        "step": 20,
        "loss": 2.5,
        "ce": 2.4,
        "aux": 0.1,
        "lr": 1e-3,
        "grad_norm": 0.7,
        "tokens_per_s": 1000.0,
        "flops_per_s": 1e9,
        "load": {
            "0": {"tokens": 10, "max_over_mean": 1.5, "cv": 0.3, "dead": 1, "dropped_fraction": 0.25},
            "1": {"tokens": 10, "max_over_mean": 2.0, "cv": 0.1, "dead": 2},
        },
    }
    s = scalars(train_line)
    assert s["train/loss"] == 2.5 and s["train/lr"] == 1e-3 and s["train/grad_norm"] == 0.7
    assert s["load/layer1/max_over_mean"] == 2.0 and s["load/layer0/dropped_fraction"] == 0.25
    # the worst layer's figures; dead experts of all layers
    assert s["load/max_cv"] == 0.3 and s["load/max_over_mean"] == 2.0 and s["load/dead_experts"] == 3
    assert s["load/dropped_fraction"] == 0.25
    ev = scalars({"kind": "eval", "step": 0, "val_loss": 5.5, "val_bits_per_byte": None})
    assert ev == {"eval/val_loss": 5.5}  # None (and NaN) are left out
    assert scalars({"kind": "eval", "val_loss": float("nan")}) == {}


def test_missing_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(MissingTracker, match=r"--log wandb: .* pip install 'moeforge\[wandb\]'"):
        check_trackers(["wandb"])
    with pytest.raises(ValueError, match="unknown tracker 'neptune'"):
        check_trackers(["neptune"])


def _train(spec, corpus, out: Path, kinds: tuple[str, ...]) -> list[dict]:
    """4 steps, a train line every step; returns metrics.jsonl's records."""
    cfg = TrainConfig(device="cpu", batch_size=4, eval_tokens=512, eval_points=2, steps=4, log_every=1)
    train(
        build(spec, seed=0),
        seq_len=spec.seq_len,
        train_flops_per_token=account(spec).train_flops_per_token,
        corpus=corpus,
        cfg=cfg,
        out_dir=out,
        progress=False,
        tracking=Tracking(kinds, out, "study-x", "trial-3/seed-0", PARAMS),
    )
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], scalars(r)[key]) for r in records if key in scalars(r)]


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same steps, and the same values to float32 (TensorBoard stores float32)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


@pytest.mark.slow
def test_tensorboard_event_files(spec, corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    records = _train(spec, corpus, tmp_path, ("tensorboard",))
    run = tmp_path / "tensorboard" / "study-x" / "trial-3" / "seed-0"  # grouped under its study
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) >= CURVES
    for key in ("train/loss", "train/lr", "eval/val_loss"):
        _same([(e.step, e.value) for e in acc.Scalars(key)], _expected(records, key))
    assert len(acc.Scalars("train/loss")) == 4
    # the parameters, as hparams of this run (what the HParams dashboard lists)
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["moe.top_k"].number_value == 2 and info.hparams["granularity"].number_value == 4


def _wandb_records(path: Path):
    """The records of a W&B offline run file (.wandb): LevelDB log blocks of protobuf Records after a
    7-byte header, read here because wandb >= 0.19 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(buf)


@pytest.mark.slow
def test_wandb_offline_run(spec, corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = _train(spec, corpus, tmp_path, ("wandb",))
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, list[tuple[int, float]]] = {}
    run = None
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                history.setdefault(k, []).append((items["_step"], v))
    assert run is not None and run.run_group == "study-x" and run.display_name == "trial-3/seed-0"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["moe.top_k"] == 2 and config["granularity"] == 4
    assert set(history) >= CURVES
    for key in ("train/loss", "train/grad_norm", "eval/val_loss"):
        _same(history[key], _expected(records, key))


@pytest.mark.slow
def test_mlflow_store(spec, corpus, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    records = _train(spec, corpus, tmp_path, ("mlflow",))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-x")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "trial-3/seed-0" and run.info.status == "FINISHED"
    assert run.data.params["moe.top_k"] == "2" and run.data.tags["param.granularity"] == "4"
    assert set(run.data.metrics) >= CURVES
    for key in ("train/loss", "load/max_cv", "eval/val_loss"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        _same(got, _expected(records, key))
