"""The MoE layer against DeepSeekMoE's equations, written out independently here."""

import pytest
import torch
import torch.nn.functional as F
from moeforge.runtime import MoE

from moeforge import compiler


def _moe(**kw):
    torch.manual_seed(0)
    args = dict(dim=16, n_routed=8, top_k=3, hidden=8, n_shared=2, activation="swiglu")
    args.update(kw)
    m = MoE(**args)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def _expert(w1, w3, w2, x):
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def test_moe_output_is_shared_plus_gated_routed_experts():
    """out_t = sum shared_i(u_t) + sum_{i in topK} g_i,t FFN_i(u_t), g the softmax over routed experts."""
    m = _moe()
    x = torch.randn(2, 5, 16)
    out, _ = m(x)
    u = x.reshape(-1, 16)
    s = (u @ m.router.weight.t()).softmax(-1)
    g, idx = s.topk(3, dim=-1)
    E = m.experts
    ref = torch.zeros_like(u)
    for t in range(u.shape[0]):
        for k in range(3):
            e = idx[t, k]
            ref[t] += g[t, k] * _expert(E.w1[e], E.w3[e], E.w2[e], u[t])
    # Two shared experts of width 8 are one FFN of width 16: split it and add them one by one.
    sh = m.shared
    for i in range(2):
        rows = slice(8 * i, 8 * (i + 1))
        ref += _expert(sh.w1.weight[rows], sh.w3.weight[rows], sh.w2.weight[:, rows], u)
    torch.testing.assert_close(out.reshape(-1, 16), ref, rtol=1e-5, atol=1e-5)


def _reference_losses(scores_BSE, idx_BSK, E, K, a1, a2, D, per_sequence):
    """REFERENCE.md: f_i = N'/(K' T) sum_t 1(t chooses i), P_i = mean_t s_i,t; device groups of E/D."""
    B, S, _ = scores_BSE.shape

    def f_P(scores_TE, idx_TK):
        T = scores_TE.shape[0]
        f = torch.tensor([(idx_TK == i).sum().item() * E / (K * T) for i in range(E)])
        return f, scores_TE.mean(0)

    if per_sequence:
        exp = torch.stack(
            [(lambda fp: (fp[0] * fp[1]).sum())(f_P(scores_BSE[b], idx_BSK[b])) for b in range(B)]
        ).mean()
    else:
        f, P = f_P(scores_BSE.reshape(B * S, E), idx_BSK.reshape(B * S, K))
        exp = (f * P).sum()
    f, P = f_P(scores_BSE.reshape(B * S, E), idx_BSK.reshape(B * S, K))
    g = E // D
    dev = sum(f[d * g : (d + 1) * g].mean() * P[d * g : (d + 1) * g].sum() for d in range(D))
    return a1 * exp + a2 * dev


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("a2,D", [(0.0, 1), (0.05, 4)])
def test_balance_losses_match_the_paper(per_sequence, a2, D):
    m = _moe(expert_alpha=0.01, per_sequence=per_sequence, device_alpha=a2, device_groups=D)
    x = torch.randn(3, 7, 16)
    _, aux = m(x)
    scores = (x.reshape(-1, 16) @ m.router.weight.t()).softmax(-1).view(3, 7, 8)
    idx = scores.topk(3, dim=-1).indices
    ref = _reference_losses(scores, idx, 8, 3, 0.01, a2, D, per_sequence)
    torch.testing.assert_close(aux, ref.to(aux.dtype), rtol=1e-5, atol=1e-7)


def test_balance_loss_is_minimal_when_routing_is_uniform():
    """With perfectly uniform scores and counts, f_i = 1 and P_i = 1/E, so L = a1 exactly."""
    m = _moe(expert_alpha=1.0, n_routed=4, top_k=2)
    scores = torch.full((1, 4, 4), 0.25)
    idx = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    torch.testing.assert_close(m.balance_loss(scores, idx), torch.tensor(1.0))


def test_balance_loss_gradient_flows_to_router_only_through_P():
    m = _moe(expert_alpha=0.1)
    x = torch.randn(2, 4, 16)
    _, aux = m(x)
    aux.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_normalize_and_scaling():
    m = _moe(normalize_topk=True, routed_scaling=2.5, n_shared=0)
    x = torch.randn(1, 3, 16)
    out, _ = m(x)
    u = x.reshape(-1, 16)
    g, idx = (u @ m.router.weight.t()).softmax(-1).topk(3, dim=-1)
    g = 2.5 * g / g.sum(-1, keepdim=True)
    E = m.experts
    ref = torch.stack(
        [
            sum(g[t, k] * _expert(E.w1[idx[t, k]], E.w3[idx[t, k]], E.w2[idx[t, k]], u[t]) for k in range(3))
            for t in range(3)
        ]
    )
    torch.testing.assert_close(out.reshape(-1, 16), ref, rtol=1e-5, atol=1e-5)


def test_model_forward_shapes_and_dense_aux_is_zero():
    spec = compiler.load_spec("debug")
    model = compiler.build(spec, seed=0)
    out = model(torch.randint(0, spec.vocab_size, (2, 16)))
    assert out.logits.shape == (2, 16, spec.vocab_size)
    assert out.aux_loss.item() > 0
    dense = compiler.build(compiler.load_spec("debug", ["moe=null"]), seed=0)
    assert dense(torch.randint(0, 256, (1, 8))).aux_loss.item() == 0.0


def test_build_is_deterministic_with_seed_and_causal():
    spec = compiler.load_spec("debug")
    a, b = compiler.build(spec, seed=3), compiler.build(spec, seed=3)
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(a(ids).logits, b(ids).logits)
    # Causality: changing a later token must not change earlier logits.
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 256
    torch.testing.assert_close(a(ids).logits[:, :-1], a(ids2).logits[:, :-1])


def test_router_logits_are_fp32_under_bf16_autocast():
    """The router matmul runs in fp32 under autocast (DeepSeek-V3): bf16 would round nearby logits together
    and change top-k choices, ties, the selection bias's effect and the balance losses."""
    m = _moe(expert_alpha=0.01)
    x = torch.randn(2, 9, 16)
    ref = F.linear(x.reshape(-1, 16).double(), m.router.weight.double()).float()  # fp32-exact reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m.router(x.reshape(-1, 16))
        bf16 = torch.nn.Linear(16, 8, bias=False)
        bf16.weight = m.router.weight
        assert bf16(x.reshape(-1, 16)).dtype == torch.bfloat16  # what a plain nn.Linear would do
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(logits, m.router(x.reshape(-1, 16)), rtol=0, atol=0)  # as without autocast
    # the routing under autocast reads those logits: the same experts as in fp32, and an fp32 balance loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, aux = m(x)
    _, aux32 = m(x)
    assert aux.dtype == torch.float32
    torch.testing.assert_close(aux, aux32, rtol=0, atol=0)
    assert isinstance(m.router, torch.nn.Linear) and list(m.state_dict())[0] == "router.weight"
