"""DeepSeek-V3 routing pieces in `moeforge.runtime.MoE`: the selection bias chooses but does not weigh; the sign rule."""

from __future__ import annotations

import torch
from moeforge.runtime import MoE


def _moe(**kw) -> MoE:
    torch.manual_seed(0)
    moe = MoE(16, n_routed=8, top_k=2, hidden=8, score="sigmoid", selection_bias=True, **kw)
    for p in moe.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    return moe


def test_bias_changes_the_choice_not_the_weights():
    moe = _moe()
    x_TD = torch.randn(32, 16)
    scores_TE = moe.router(x_TD).sigmoid()
    with torch.no_grad():
        moe.selection_bias.copy_(torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0]))
    idx_TK = moe._choose(scores_TE)
    assert (idx_TK.sort(dim=-1).values == torch.tensor([0, 1])).all()  # the bias decided
    # ...but the output weighs experts 0 and 1 by their unbiased scores: same as with no bias and forced choice
    with torch.no_grad():
        out = moe(x_TD[None])[0][0]
        ref = moe.experts.forward_loop(x_TD, idx_TK, scores_TE.gather(1, idx_TK))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_sign_rule_moves_bias_against_load_and_counts_restart():
    moe = _moe(bias_update_speed=0.01).train()
    x = torch.randn(4, 16, 16)
    moe(x)
    load_E = moe.load_E.clone()
    assert load_E.sum() == 4 * 16 * 2
    moe.update_bias()
    expected = 0.01 * torch.sign(load_E.mean() - load_E)
    torch.testing.assert_close(moe.selection_bias.detach(), expected)
    assert moe.load_E.sum() == 0
    assert not moe.selection_bias.requires_grad  # moved by the rule, never by the optimizer


def test_eval_does_not_count_and_frozen_bias_stays():
    moe = _moe().eval()
    moe(torch.randn(2, 8, 16))
    assert moe.load_E.sum() == 0
    moe.update_bias()
    assert moe.selection_bias.abs().sum() == 0


def test_group_limited_routing_stays_in_topk_groups():
    torch.manual_seed(1)
    moe = MoE(16, n_routed=8, top_k=2, hidden=8, n_group=4, topk_group=1)
    scores_TE = torch.rand(64, 8).softmax(-1)
    idx_TK = moe._choose(scores_TE)
    assert (idx_TK[:, 0] // 2 == idx_TK[:, 1] // 2).all()  # one group of 2 allowed: both from it
    best_group_T = scores_TE.view(64, 4, 2).amax(-1).argmax(-1)
    assert (idx_TK[:, 0] // 2 == best_group_T).all()
