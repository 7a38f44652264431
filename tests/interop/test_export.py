"""Every spec family leaves moeforge as a stock transformers class: export with weights, load with
AutoModelForCausalLM (no trust_remote_code), same logits (fp32), `generate` runs, import gives the spec and
weights back, and transformers' num_parameters() is moeforge's total plus what the format adds (named).
Then a search winner through the CLI, and the bad inputs (one line, exit 2)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from moeforge.compiler._hf.export import spec_to_config
from moeforge.compiler._hf.importer import config_to_spec
from moeforge.compiler._hf.weights import added_parameters, hf_to_state_dict

from moeforge import compiler
from moeforge.cli import main

transformers = pytest.importorskip("transformers")

TINY = dict(name="tiny", vocab_size=97, d_model=32, n_layers=2, seq_len=64, ffn={"hidden": 48})
MHA = {"kind": "mha", "n_heads": 4}
GQA = {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2}
MLA = {"kind": "mla", "n_heads": 4, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
       "v_head_dim": 6}  # fmt: skip
MOE = dict(routed_experts=8, top_k=2, expert_hidden=12)

# case: (spec data, the format auto must choose)
CASES = {
    # DeepSeekMoE as debug/quickstart build it: MHA, one plain shared expert, softmax top-k unnormalized
    "deepseekmoe_mha": (dict(attention=MHA, moe=dict(MOE, shared_experts=1)), "qwen2_moe"),
    # two shared experts (concatenated into one shared MLP), GQA, qkv bias, a dense first layer
    "deepseekmoe_gqa_2shared": (
        dict(attention=dict(GQA, qkv_bias=True), moe=dict(MOE, shared_experts=2, first_dense=1)),
        "qwen2_moe",
    ),
    # no shared expert, no qk-norm, unnormalized top-k: qwen2_moe with a zero-width shared MLP
    "no_shared": (dict(attention=MHA, moe=MOE), "qwen2_moe"),
    "qwen2_gated": (
        dict(attention=MHA, moe=dict(MOE, shared_experts=1, shared_hidden=20, shared_gate=True)),
        "qwen2_moe",
    ),  # fmt: skip
    "qwen3": (
        dict(attention=dict(GQA, qk_norm="head"), moe=dict(MOE, gate={"normalize_topk": True})),
        "qwen3_moe",
    ),
    "olmoe": (dict(attention=dict(MHA, qk_norm="full"), moe=MOE), "olmoe"),
    "mixtral": (dict(attention=GQA, moe=dict(MOE, gate={"normalize_topk": True})), "mixtral"),
    "deepseek_v2": (dict(attention=MLA, moe=dict(MOE, shared_experts=2, first_dense=1)), "deepseek_v2"),
    "deepseek_v3": (
        dict(
            attention=dict(MLA, q_lora_rank=10),
            moe=dict(
                MOE,
                shared_experts=1,
                gate={
                    "score": "sigmoid",
                    "selection_bias": True,
                    "normalize_topk": True,
                    "routed_scaling": 2.5,
                    "n_group": 4,
                    "topk_group": 2,
                },
            ),
        ),
        "deepseek_v3",
    ),  # fmt: skip
    # DeepSeek-V3's routing without MLA (GLM-4.5): sigmoid, selection bias, groups, per-head qk-norm, q/k/v bias
    "glm4_v3_routing": (
        dict(
            attention=dict(GQA, qkv_bias=True, qk_norm="head"),
            moe=dict(
                MOE,
                shared_experts=1,
                first_dense=1,
                gate={
                    "score": "sigmoid",
                    "selection_bias": True,
                    "normalize_topk": True,
                    "routed_scaling": 2.5,
                    "n_group": 4,
                    "topk_group": 2,
                    "bias_update_speed": 0.001,
                },
                balance={"expert_alpha": 0.003},
            ),
        ),
        "glm4_moe",
    ),  # fmt: skip
    # sigmoid without a bias (a zero one there), no shared expert (a zero-width shared MLP there)
    "glm4_no_bias_no_shared": (dict(attention=MHA, moe=dict(MOE, gate={"score": "sigmoid"})), "glm4_moe"),
    "glm4_buffer_2shared_tied": (
        dict(
            tie_embeddings=True,
            attention=GQA,
            moe=dict(
                MOE,
                shared_experts=2,
                gate={"score": "sigmoid", "selection_bias": True, "bias_is_parameter": False},
            ),
        ),
        "glm4_moe",
    ),  # fmt: skip
    # dense specs (no moe section), deepseek-7b-dense's form: MHA with an explicit head_dim
    "llama": (dict(attention=dict(MHA, head_dim=8)), "llama"),
    "llama_gqa_bias_tied": (
        dict(
            tie_embeddings=True,
            attention=dict(GQA, qkv_bias=True, out_bias=True),
            positions={"kind": "rope", "theta": 5e5},
        ),
        "llama",
    ),
    "qwen2_dense": (dict(attention=dict(GQA, qkv_bias=True)), "qwen2"),
    "qwen3_dense": (dict(attention=dict(GQA, head_dim=16, qk_norm="head")), "qwen3"),
}


def _spec(case: str):
    data, _ = CASES[case]
    return compiler.ModelSpec.model_validate({**TINY, **data, "name": case})


def _random_state(spec) -> dict[str, torch.Tensor]:
    """Every weight random (norms near 1, routers spread so the choice is far from ties, a non-zero bias)."""
    model = compiler.build(spec, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():
        if "norm" in name:
            state[name] = 1 + 0.2 * torch.randn(p.shape, generator=gen)
        elif "router" in name:
            state[name] = 0.5 * torch.randn(p.shape, generator=gen)
        elif "selection_bias" in name:
            state[name] = 0.1 * torch.randn(p.shape, generator=gen)
        else:
            state[name] = 0.08 * torch.randn(p.shape, generator=gen)
    return state


def _comparable(spec) -> dict:
    """The numbers of a spec: its name and the form it was written in (paper or fine-grained) aside."""
    data = spec.model_dump(exclude={"name"})
    data["attention"]["head_dim"] = spec.head_dim
    d = spec.moe_derived
    if d is None:
        return data
    data["moe"].update(paper=None, shared_hidden=d.shared_hidden, shared_experts=d.shared_experts,
                       routed_experts=d.routed_experts, top_k=d.top_k, expert_hidden=d.expert_hidden)  # fmt: skip
    return data


@pytest.mark.parametrize("case", list(CASES))
def test_family_exports_exactly_to_a_stock_class(case, tmp_path):
    from safetensors.torch import load_file, save_file

    spec = _spec(case)
    assert compiler.choose_format(spec) == CASES[case][1]
    state = _random_state(spec)
    save_file(state, str(tmp_path / "ours.safetensors"))
    compiler.export_hf(spec, tmp_path / "hf", checkpoint=tmp_path / "ours.safetensors")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == CASES[case][1] and "auto_map" not in cfg

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(hf).__module__.startswith("transformers.models.")  # a stock class, no remote code
    ours = compiler.build(spec, dtype=torch.float32).eval()
    ours.load_state_dict(state)
    ids = torch.randint(0, spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = ours(ids).logits, hf(ids).logits
        generated = hf.generate(ids[:1, :6], max_new_tokens=3, do_sample=False)
    assert ref.abs().max() > 0.1
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"{case}: max relative logit difference {rel:.2e}"
    assert generated.shape == (1, 9)

    added = added_parameters(spec, cfg["model_type"])
    assert hf.num_parameters() == compiler.account(spec).params_total + sum(added.values())

    # export -> import: the same spec numbers and the same weights
    again, _ = config_to_spec(cfg, case)
    assert _comparable(again) == _comparable(spec)
    back = hf_to_state_dict(again, cfg["model_type"], load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state), case


def test_auto_never_picks_remote_code_but_names_it(tmp_path, capsys):
    spec = compiler.load_spec("deepseekmoe-16b")
    assert compiler.choose_format(spec) == "qwen2_moe"
    assert spec_to_config(spec, "deepseek")["model_type"] == "deepseek"
    assert main(["export", "hf", "debug", "--format", "deepseek", "--out", str(tmp_path / "ds")]) == 0
    assert "format: deepseek (remote code)" in capsys.readouterr().out
    assert main(["export", "hf", "debug", "--out", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert "format: qwen2_moe (stock transformers class)" in out
    assert "Byte-level" in (tmp_path / "auto" / "README.md").read_text()


def test_forced_format_that_cannot_express_names_the_field(tmp_path, capsys):
    assert main(["export", "hf", "debug", "--format", "mixtral", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "moe.gate.normalize_topk" in err and "\n" not in err


def test_inexpressible_spec_names_feature_and_nearest_change(tmp_path, capsys):
    assert main(["export", "hf", "deepseekmoe-2b", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "ffn.activation" in err and "use ffn.activation: swiglu" in err and "\n" not in err
    assert main(["export", "hf", "debug", "--set", "moe.gate.routed_scaling=2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "moe.gate.routed_scaling" in err and "nearest stock format: qwen2_moe" in err


SIGMOID = {"score": "sigmoid", "selection_bias": True}


@pytest.mark.parametrize(
    ("change", "fmt", "named"),
    [
        # sigmoid routing without MLA goes to glm4_moe; what glm4_moe cannot do is named with the nearest change
        ({"attention": dict(GQA, qkv_bias=True, out_bias=True)}, "glm4_moe", "attention.out_bias"),
        ({"attention": dict(MHA, qk_norm="full")}, "glm4_moe", "use qk_norm: head"),
        ({"moe": dict(MOE, gate={"score": "sigmoid", "n_group": 4, "topk_group": 2})}, "glm4_moe",
         "set moe.gate.selection_bias: true"),
        ({"moe": dict(MOE, gate=SIGMOID, layers=[0])}, "glm4_moe", "moe.layers"),
        ({"moe": dict(MOE, gate=SIGMOID, shared_experts=1, shared_hidden=20)}, "glm4_moe", "moe.shared_hidden"),
        ({"moe": dict(MOE, gate={"score": "softmax", "selection_bias": True})}, "glm4_moe", "moe.gate.score"),
        # dense specs: llama, qwen2 or qwen3, else the feature
        ({"moe": None, "attention": dict(MHA, qk_norm="full")}, None, "attention.qk_norm: full"),
        ({"moe": None, "attention": dict(MHA, out_bias=True)}, "llama", "attention.out_bias"),
        ({"moe": None, "attention": MLA}, None, "attention.kind: mla is in no stock dense class"),
    ],
    ids=["out-bias", "qk-norm-full", "groups-without-bias", "layers-not-suffix", "shared-width",
         "softmax-bias", "dense-qk-full", "dense-out-bias-only", "dense-mla"],
)  # fmt: skip
def test_glm4_and_dense_limits_are_one_line(change, fmt, named):
    base = dict(attention=MHA, moe=dict(MOE, gate=SIGMOID))
    spec = compiler.ModelSpec.model_validate({**TINY, **base, **change})
    with pytest.raises(compiler.HFError) as e:
        compiler.choose_format(spec)
    msg = str(e.value)
    assert named in msg and "\n" not in msg, msg
    if fmt is not None:
        assert f"nearest stock format: {fmt}" in msg, msg


def test_dense_paper_spec_exports_as_llama_with_its_counts(tmp_path, capsys):
    """deepseek-7b-dense at full size (config only; counted on the meta device) and at tiny size (weights)."""
    assert main(["export", "hf", "deepseek-7b-dense", "--out", str(tmp_path / "7b"), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "format: llama (stock transformers class)" in printed
    # the verdict a person reads: the counts compared, and no logits without weights
    assert (
        "parameters: moeforge counts 6,910,365,696; transformers' num_parameters() gives 6,910,365,696: equal"
        in printed
    )
    assert "logits: not compared (no weights" in printed and printed.rstrip().endswith("verdict: PASS")
    assert "A dense model" in (tmp_path / "7b" / "README.md").read_text()
    tiny = ["--set", "d_model=64", "--set", "n_layers=2", "--set", "vocab_size=256", "--set", "ffn.hidden=96",
            "--set", "attention.head_dim=16", "--set", "seq_len=64"]  # fmt: skip
    spec = compiler.load_spec("deepseek-7b-dense", [a for a in tiny if a != "--set"])
    from moeforge.runtime import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", compiler.build(spec, seed=0), None, {"step": 1})
    args = ["export", "hf", "deepseek-7b-dense", *tiny, "--checkpoint", str(tmp_path / "ckpt")]
    assert main([*args, "--out", str(tmp_path / "tiny"), "--check", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # --json: stdout is the record alone; what was written goes to stderr
    assert result["max_rel_logit_diff"] <= 1e-5 and len(result["generated"]) == 4
    assert result["params_transformers"] == result["params_ours"] and "wrote" in captured.err


def test_dense_gelu_spec_names_the_activation(tmp_path, capsys):
    assert main(["export", "hf", "dense-2b", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "ffn.activation: gelu FFNs are in no stock dense class" in err and "\n" not in err


def test_glm_config_with_partial_rope_is_an_import_error():
    cfg = spec_to_config(_spec("glm4_v3_routing"))
    config_to_spec(cfg)  # as exported: partial_rotary_factor 1
    with pytest.raises(compiler.HFError, match="partial_rotary_factor: 0.5"):
        config_to_spec({k: v for k, v in cfg.items() if k != "partial_rotary_factor"})  # GLM-4.5's default


# ---------------------------------------------------------------------------------------- run dirs
def _run_dir(tmp_path, n_trials: int = 2):
    """A search run dir as the search leaves it: trials.json, run.json, and per-trial checkpoints."""
    from moeforge.runtime import save_checkpoint

    run = tmp_path / "run"
    records = []
    for number, shared in zip(range(n_trials), (1, 0, 1), strict=False):
        spec = compiler.load_spec("debug", [f"moe.shared_experts={shared}"])
        trial_dir = f"trials/key{number}"
        seed_dir = run / trial_dir / "seed-0"
        model = compiler.build(spec, seed=number)
        save_checkpoint(seed_dir / "checkpoint", model, None, {"step": 1})
        (seed_dir / "summary.json").write_text(json.dumps({"corpus": "bundled:stdlib"}))
        records.append(
            {
                "number": number,
                "state": "COMPLETE",
                "value": 3.0 + number,
                "params": {"K_s": shared},
                "trial_dir": trial_dir,
                "spec": spec.model_dump(mode="json"),
                "budget_flops": 1e9,
                "tokens": 1000,
                "seed_values": None,
            }  # fmt: skip
        )
    records.append({"number": n_trials, "state": "FAIL", "value": None, "params": {}, "trial_dir": None})
    (run / "trials.json").write_text(json.dumps(records))
    (run / "run.json").write_text(json.dumps({"search": "quickstart", "study": "quickstart"}))
    return run


def test_run_dir_exports_the_winner_with_weights(tmp_path, capsys):
    run = _run_dir(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", "hf", str(run), "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "trial 0 of" in printed and "format: qwen2_moe" in printed
    # the verdict: the counts with what transformers adds, the logits on held-out text with their numbers
    spec = compiler.load_spec("debug")
    n, gate = compiler.account(spec).params_total, spec.d_model * len(spec.moe_layers)
    assert (
        f"parameters: moeforge counts {n:,}, with +{gate:,} shared_expert_gate (pinned at 0): {n + gate:,}; "
        f"transformers' num_parameters() gives {n + gate:,}: equal" in printed
    ), printed
    logits = re.search(r"logits: 128 tokens \(bundled:stdlib validation split\) through both models in fp32: "
                       r"max \|difference\| (\S+), relative (\S+) \(tolerance 1e-05\)\n", printed)  # fmt: skip
    assert logits and float(logits.group(2)) <= 1e-5, printed
    assert printed.rstrip().endswith("verdict: PASS")
    card = (out / "README.md").read_text()
    assert (
        "trial 0" in card and "runner-up: trial 1" in card and "1e+09 FLOPs" in card and "Byte-level" in card
    )
    # the exported weights are trial 0's
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = compiler.build(compiler.load_spec("debug"), seed=0)
    torch.testing.assert_close(hf.model.embed_tokens.weight, ref.tok_embeddings.weight, rtol=0, atol=0)
    # --trial picks another, which here has no shared expert
    assert main(["export", "hf", str(run), "--trial", "1", "--out", str(tmp_path / "t1")]) == 0
    cfg = json.loads((tmp_path / "t1" / "config.json").read_text())
    assert cfg["moeforge"]["shared_experts"] == 0


@pytest.mark.parametrize(
    ("make", "args", "named"),
    [
        (lambda run: None, ["--trial", "9"], "--trial 9: no such trial"),
        (lambda run: None, ["--trial", "2"], "--trial 2: FAIL"),
        (lambda run: (run / "trials.json").unlink(), [], "not a search run dir"),
        (
            lambda run: [p.unlink() for p in run.glob("trials/*/seed-0/checkpoint/model.safetensors")],
            [],
            "no checkpoint under",
        ),
        (
            lambda run: (run / "trials.json").write_text(
                (run / "trials.json").read_text().replace('"d_model": 64', '"d_model": 32')
            ),
            [],
            "has shape",
        ),
    ],
    ids=["no-such-trial", "failed-trial", "no-trials-json", "no-checkpoints", "shapes"],
)
def test_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, make, args, named):
    run = _run_dir(tmp_path)
    make(run)
    assert main(["export", "hf", str(run), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_out_folder_holding_another_model_is_refused(tmp_path, capsys):
    assert main(["export", "hf", "qwen3-30b-a3b", "--out", str(tmp_path)]) == 0
    assert main(["export", "hf", "qwen3-30b-a3b", "--out", str(tmp_path)]) == 0  # the same model again: fine
    capsys.readouterr()
    assert main(["export", "hf", "debug", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds another model" in err and "\n" not in err
    assert main(["export", "hf", "debug", "--out", str(tmp_path), "--force"]) == 0


@pytest.mark.slow  # about 10 s: a real two-trial search on the bundled corpus
def test_real_search_winner_exports_and_loads(tmp_path, capsys):
    from moeforge.search import RunConfig, load_search, run_search

    search = load_search("quickstart")
    search = search.model_copy(
        update={
            "n_trials": 2,
            "budget": search.budget.model_copy(update={"train_flops": 2e10}),
            "train": search.train.model_copy(update={"eval_points": 2, "options": {"eval_tokens": 1024}}),
        }
    )
    run = tmp_path / "run"
    run_search(search, RunConfig(run, workers=1, plots=False), log=lambda _: None)
    out = tmp_path / "exported"
    assert main(["export", "hf", str(run), "--out", str(out), "--check", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_rel_logit_diff"] <= 1e-5 and result["compared_on"].endswith("validation split")
    assert "val_loss" in (out / "README.md").read_text()  # the metric, read from the study
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([list(b"def main(")])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 13)
