"""`moeforge import hf` / `moeforge export hf` on files laid out like the Hub's, and their errors (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moeforge import compiler
from moeforge.cli import main

CONFIGS = Path(__file__).parent / "configs"


def test_import_config_only_writes_a_loadable_spec(tmp_path, capsys):
    assert main(["import", "hf", str(CONFIGS / "deepseek-v3" / "config.json"), "--out", str(tmp_path)]) == 0
    spec = compiler.load_spec(tmp_path / "deepseek-v3.yaml")
    assert spec.attention.kind == "mla" and spec.moe.gate.selection_bias
    assert "num_nextn_predict_layers" in capsys.readouterr().err  # not dropped silently: noted
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"clip_qkv": 8.0}, "clip_qkv"),
        ({"some_new_feature": 1}, "some_new_feature"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
        ({"model_type": "gemma"}, "model_type"),
    ],
)
def test_inexpressible_field_is_a_one_line_error(tmp_path, capsys, change, named):
    config = json.loads((CONFIGS / "olmoe-1b-7b" / "config.json").read_text()) | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["import", "hf", str(tmp_path / "config.json"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and "Traceback" not in err


def test_import_sharded_checkpoint_matches_build(tmp_path):
    from moeforge.compiler._hf.io import export_hf
    from safetensors.torch import load_file, save_file

    spec = compiler.load_spec("debug")
    ours = compiler.build(spec, seed=0)
    save_file(ours.state_dict(), str(tmp_path / "ours.safetensors"))
    export_hf(spec, tmp_path / "hf", checkpoint=tmp_path / "ours.safetensors")
    # Re-shard the export the way the Hub does: two files and an index.
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    hub = tmp_path / "hub-model"
    hub.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", hub / "config.json")
    for file, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(hub / file))
    index = {"weight_map": {k: f for f, names in shards.items() for k in names}}
    (hub / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["import", "hf", str(hub), "--out", str(tmp_path / "back"), "--name", "debug"]) == 0
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    expected = ours.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    assert compiler.load_spec(tmp_path / "back" / "debug.yaml") == spec


def test_export_refuses_what_no_family_expresses(tmp_path, capsys):
    code = main(["export", "hf", "debug", "--set", "norm.kind=layernorm", "--out", str(tmp_path)])
    assert code == 2
    assert "norm.kind" in capsys.readouterr().err


def test_export_config_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", "hf", "qwen3-30b-a3b", "--out", str(tmp_path)]) == 0
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert (
        sum(p.numel() for p in model.parameters())
        == compiler.account(compiler.load_spec("qwen3-30b-a3b")).params_total
    )
