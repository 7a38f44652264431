"""The model spec: one frozen pydantic model per YAML section.

Every field carries its documentation as an attribute docstring; pydantic turns those into the JSON
Schema descriptions that editors show (``moeforge schema``). Derived quantities (fine-grained expert
counts, routed top-k, expert width, head dim) are computed properties, never rewritten fields.

DeepSeekMoE's two ways of writing an MoE layer (arXiv 2401.06066, section 3):

* fine-grained form: ``routed_experts``, ``shared_experts``, ``top_k``, ``expert_hidden`` as built;
* paper form: ``paper: {experts: N, top_k: K, m: m, shared: K_s}`` with experts of the standard FFN width,
  from which routed = mN - K_s experts of width standard/m, routed top-k = mK - K_s, and K_s shared.

Both may be written; then they must agree. A spec that inherits another (``base:``) and writes one form
replaces the base's other form, so switching forms needs no ``null``s (see `merge_specs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

# Sanity bounds: large enough for any model anyone trains, small enough that arithmetic stays exact and
# an absurd value (d_model: 1e30) is an error, not an overflow.
MAX_WIDTH = 1 << 20
MAX_VOCAB = 1 << 24
MAX_LAYERS = 4096
MAX_SEQ = 1 << 24
MAX_EXPERTS = 1 << 16


def _recheck(info: ValidationInfo) -> bool:
    """Whether this is the loader's second pass, which runs the cross-field checks on what parsed: a
    section's own check that cannot break them is skipped there (the first pass reported it)."""
    return bool(info.context and info.context.get("recheck"))


class _Section(BaseModel):
    # allow_inf_nan=False: `theta: .inf` is an error, not a model that cannot be built.
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- norms
class NormSpec(_Section):
    kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """rmsnorm (a weight per channel) or layernorm (weight and bias per channel)."""
    eps: float = Field(1e-6, gt=0, lt=1)
    """Added to the variance for numerical stability."""


# ------------------------------------------------------------------------------------------ positions
class YarnSpec(_Section):
    """YaRN context extension of RoPE (arXiv 2309.00071), as DeepSeek-V2/V3 configure it."""

    factor: float = Field(gt=0, le=1e6)
    """Ratio of the extended context to the original one."""
    original_max_position_embeddings: int = Field(gt=0, le=MAX_SEQ)
    """Context length the model was pretrained with."""
    beta_fast: float = Field(32.0, gt=0)
    """Rotations above which frequencies are kept (extrapolated)."""
    beta_slow: float = Field(1.0, gt=0)
    """Rotations below which frequencies are divided by factor (interpolated)."""
    mscale: float = Field(1.0, ge=0)
    """Scales log(factor) in the numerator of the cos/sin attention factor."""
    mscale_all_dim: float = Field(0.0, ge=0)
    """Scales log(factor) in its denominator; MLA also multiplies the softmax scale by its mscale squared."""


class RopeSpec(_Section):
    kind: Literal["rope"] = "rope"
    """Rotary position embeddings (RoPE), applied to queries and keys."""
    theta: float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    yarn: YarnSpec | None = None
    """YaRN frequency scaling (DeepSeek-V2/V3's rope_scaling); null is plain RoPE."""


class LearnedPositionsSpec(_Section):
    kind: Literal["learned"]
    """A learned table of seq_len x d_model position embeddings."""


class NoPositionsSpec(_Section):
    kind: Literal["none"]
    """No position information (NoPE)."""


PositionsSpec = Annotated[RopeSpec | LearnedPositionsSpec | NoPositionsSpec, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------ attention
class _AttentionBase(_Section):
    n_heads: int = Field(gt=0, le=MAX_WIDTH)
    """Number of query heads."""
    head_dim: int | None = Field(None, gt=0, le=MAX_WIDTH)
    """Width of each head; default d_model / n_heads."""
    qkv_bias: bool = False
    """Bias on the q, k and v projections (Qwen2)."""
    out_bias: bool = False
    """Bias on the output projection."""
    qk_norm: Literal["none", "head", "full"] = "none"
    """RMSNorm on queries and keys: per head (Qwen3), over the whole projection (OLMoE), or none."""


class MHASpec(_AttentionBase):
    kind: Literal["mha"] = "mha"
    """Multi-head attention: as many key/value heads as query heads."""

    @property
    def kv_heads(self) -> int:
        return self.n_heads


class GQASpec(_AttentionBase):
    kind: Literal["gqa"]
    """Grouped-query attention: n_kv_heads key/value heads shared by groups of query heads."""
    n_kv_heads: int = Field(gt=0, le=MAX_WIDTH)
    """Number of key/value heads; must divide n_heads."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads

    @model_validator(mode="after")
    def _kv_divides(self, info: ValidationInfo) -> GQASpec:
        if self.n_heads % self.n_kv_heads and not _recheck(info):
            raise ValueError(
                f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}; "
                f"pick a divisor of {self.n_heads}"
            )
        return self


class MLASpec(_Section):
    kind: Literal["mla"]
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434 section 2.1): keys and values come from a
    shared low-rank latent c_kv (RMSNorm'd), queries optionally from a latent c_q; RoPE is applied to a
    decoupled part of each query head and to one key shared by all heads."""
    n_heads: int = Field(gt=0, le=MAX_WIDTH)
    """Number of attention heads."""
    q_lora_rank: int | None = Field(None, gt=0, le=MAX_WIDTH)
    """Rank of the query compression (DeepSeek-V2/V3); null projects queries directly (V2-Lite)."""
    kv_lora_rank: int = Field(gt=0, le=MAX_WIDTH)
    """Rank of the joint key/value latent c_kv."""
    qk_nope_head_dim: int = Field(gt=0, le=MAX_WIDTH)
    """Per-head query/key width without position information."""
    qk_rope_head_dim: int = Field(gt=0, le=MAX_WIDTH)
    """Per-head query width (and shared key width) that RoPE rotates; even."""
    v_head_dim: int = Field(gt=0, le=MAX_WIDTH)
    """Per-head value width."""
    bias: bool = False
    """Bias on the q/kv down-projections and the output projection (DeepSeek's attention_bias)."""
    latent_norm_eps: float = Field(1e-6, gt=0, lt=1)
    """eps of the RMSNorms on the q and kv latents (transformers and DeepSeek use 1e-6, not rms_norm_eps)."""
    rope_interleave: bool = True
    """RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... as DeepSeek's weights expect; false rotates halves."""

    @property
    def kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        """Query/key head width: nope + rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def qk_norm(self) -> str:
        return "none"


AttentionSpec = Annotated[MHASpec | GQASpec | MLASpec, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------------ ffn
class FFNSpec(_Section):
    activation: Literal["swiglu", "gelu", "relu"] = "swiglu"
    """swiglu: three matrices (gate, up, down); gelu/relu: two (up, down). Experts use the same."""
    hidden: int = Field(gt=0, le=MAX_WIDTH)
    """Intermediate width of a dense FFN layer: the 'standard FFN' the paper form of MoE refers to."""

    @property
    def n_matrices(self) -> int:
        return 3 if self.activation == "swiglu" else 2


# ------------------------------------------------------------------------------------------------ moe
class PaperMoESpec(_Section):
    """DeepSeekMoE's own quantities (section 3): N experts of standard width, top-K, segmentation m, K_s shared."""

    experts: int = Field(gt=0, le=MAX_EXPERTS)
    """N: experts of the standard FFN width before segmentation."""
    top_k: int = Field(gt=0, le=MAX_EXPERTS)
    """K: experts per token before segmentation."""
    m: int = Field(1, gt=0, le=1024)
    """Fine-grained segmentation factor: each expert is split into m experts of width standard/m."""
    shared: int = Field(0, ge=0, le=MAX_EXPERTS)
    """K_s: fine-grained experts isolated as shared experts, always active."""
    standard_hidden: int | None = Field(None, gt=0, le=MAX_WIDTH)
    """Width of a standard expert; default ffn.hidden."""


class GateSpec(_Section):
    score: Literal["softmax", "sigmoid"] = "softmax"
    """Scoring function over the routed experts: softmax (DeepSeekMoE, V2, Qwen, Mixtral, OLMoE) or a sigmoid
    per expert (DeepSeek-V3)."""
    normalize_topk: bool = False
    """Renormalize the chosen experts' gate values to sum to 1 (Mixtral, DeepSeek-V3); DeepSeekMoE does not."""
    routed_scaling: float = Field(1.0, gt=0, le=1e6)
    """Multiplies the routed experts' gate values (DeepSeek-V2/V3's routed_scaling_factor)."""
    selection_bias: bool = False
    """A per-expert bias added to the scores only to choose the top-k (DeepSeek-V3's aux-loss-free balancing);
    gate values stay the unbiased scores."""
    bias_update_speed: float = Field(0.0, ge=0, le=1e3)
    """gamma of the sign rule applied after each training step: b_i += gamma * sign(mean load - load_i);
    0 keeps the bias fixed."""
    bias_is_parameter: bool = True
    """Count the selection bias among the parameters (DeepSeek's reference code holds it as a parameter,
    transformers as a buffer). It is never trained by gradients either way."""
    n_group: int = Field(1, gt=0, le=MAX_EXPERTS)
    """Group-limited routing (DeepSeek-V2/V3): routed experts are split into n_group groups and each token
    picks its top-k among the experts of its topk_group best groups; 1 disables it."""
    topk_group: int = Field(1, gt=0, le=MAX_EXPERTS)
    """Groups each token may use. A group's score is its best expert's score, or the sum of its two best
    (biased) scores when selection_bias is on (DeepSeek-V3)."""


class BalanceSpec(_Section):
    expert_alpha: float = Field(0.0, ge=0, le=1e3)
    """a1 of the expert-level balance loss (DeepSeekMoE eq. 12-14); 0 disables it."""
    per_sequence: bool = False
    """Compute the expert-level loss per sequence and average over the batch (DeepSeekMoE 16B's seq_aux)."""
    device_alpha: float = Field(0.0, ge=0, le=1e3)
    """a2 of the device-level balance loss (eq. 15-17); 0 disables it."""
    device_groups: int = Field(1, gt=0, le=MAX_EXPERTS)
    """D: routed experts are split into D equal groups, one per device."""


class MoESpec(_Section):
    # --- which layers are MoE
    first_dense: int = Field(0, ge=0, le=MAX_LAYERS)
    """The first k layers keep a dense FFN (DeepSeek's first_k_dense_replace)."""
    every: int = Field(1, gt=0, le=MAX_LAYERS)
    """After the dense prefix, every n-th layer is MoE (layer i is MoE when (i - first_dense) % every == 0)."""
    layers: tuple[int, ...] | None = None
    """Explicit list of MoE layer indices (0-based); replaces first_dense/every."""
    # --- fine-grained form
    routed_experts: int | None = Field(None, gt=0, le=MAX_EXPERTS)
    """Routed experts per MoE layer (mN - K_s in the paper's terms)."""
    shared_experts: int | None = Field(None, ge=0, le=MAX_EXPERTS)
    """Shared experts per MoE layer, always active (K_s)."""
    top_k: int | None = Field(None, gt=0, le=MAX_EXPERTS)
    """Routed experts chosen per token (mK - K_s)."""
    expert_hidden: int | None = Field(None, gt=0, le=MAX_WIDTH)
    """Intermediate width of one routed expert."""
    shared_hidden: int | None = Field(None, gt=0, le=MAX_WIDTH)
    """Intermediate width of one shared expert; default the routed expert width."""
    # --- paper form
    paper: PaperMoESpec | None = None
    """DeepSeekMoE's N, K, m, K_s instead of (or in agreement with) the fine-grained numbers."""
    # --- routing and balance
    gate: GateSpec = GateSpec()
    """How routed experts are scored and weighted."""
    balance: BalanceSpec = BalanceSpec()
    """Auxiliary balance losses."""
    capacity_factor: float | None = Field(None, gt=0, le=1024)
    """Token-dropping capacity (GShard/Switch baselines); null is dropless."""
    shared_gate: bool = False
    """Scale the shared experts' output by sigmoid(w . x), one gate vector per layer (Qwen2-MoE)."""

    @model_validator(mode="after")
    def _has_a_form(self, info: ValidationInfo) -> MoESpec:
        problems = []  # all at once, one line each
        fine = {"routed_experts": self.routed_experts, "top_k": self.top_k}
        missing = [k for k, v in fine.items() if v is None] if self.paper is None else []
        if missing:
            problems.append(
                f"{missing[0]}: missing ({' and '.join(missing)} are required without `paper:`); give "
                "routed_experts and top_k (and expert_hidden), or the paper form "
                "`paper: {experts: N, top_k: K, m: m, shared: K_s}`"
            )
        if self.layers is not None and not _recheck(info):  # the cross-field checks can run without these
            if self.first_dense or self.every != 1:
                problems.append("layers: an explicit list replaces first_dense/every; drop one of them")
            if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
                problems.append(f"layers: {list(self.layers)} must be distinct non-negative indices")
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --------------------------------------------------------------------------------------- derived moe
@dataclass(frozen=True)
class MoEDerived:
    """What an MoE layer is built from, whichever form the spec used."""

    routed_experts: int
    shared_experts: int
    top_k: int
    expert_hidden: int
    shared_hidden: int
    m: int | None  # segmentation factor when known (paper form)

    @property
    def activated_experts(self) -> int:
        return self.shared_experts + self.top_k


# ---------------------------------------------------------------------------------------------- model
# What each cross-field check reads, by the dotted key its problem names. When a spec has problems in
# single fields, the loader drops the values that failed and runs the checks again on what did parse
# (`moeforge.compiler.validate`); a check's problem is reported from that run only when none of the keys it
# reads was dropped, so it never speaks of a default that stood in for a bad value.
_ROUTED = ("moe.routed_experts", "moe.paper")
_TOP_K = ("moe.top_k", "moe.paper")
_SHARED = ("moe.shared_experts", "moe.paper")
_PLACEMENT = ("moe.layers", "moe.first_dense", "moe.every", "n_layers")
CHECK_READS: dict[str, tuple[str, ...]] = {
    "attention.n_heads": ("attention", "d_model"),
    "attention.n_kv_heads": ("attention",),
    "attention.qk_rope_head_dim": ("attention", "positions"),
    "attention.head_dim": ("attention", "d_model", "positions"),
    "moe.layers": _PLACEMENT,
    "moe.first_dense": _PLACEMENT,
    "moe.paper.m": ("moe.paper", "ffn.hidden"),
    "moe.paper.top_k": ("moe.paper",),
    "moe.paper.shared": ("moe.paper",),
    "moe.routed_experts": (*_ROUTED, "moe.top_k", "ffn.hidden"),
    "moe.shared_experts": _SHARED,
    "moe.top_k": (*_ROUTED, *_TOP_K, "ffn.hidden"),
    "moe.expert_hidden": ("moe.expert_hidden", "moe.paper", "ffn.hidden"),
    "moe.gate.n_group": (*_ROUTED, "moe.gate"),
    "moe.gate.topk_group": (*_ROUTED, *_TOP_K, "moe.gate"),
    "moe.gate.bias_update_speed": ("moe.gate",),
    "moe.shared_gate": (*_SHARED, "moe.shared_gate"),
    "moe.balance.device_groups": (*_ROUTED, "moe.balance.device_groups"),
}


class ModelSpec(_Section):
    """A decoder-only language model."""

    check_reads: ClassVar[dict[str, tuple[str, ...]]] = CHECK_READS
    """Opts into the loader's second pass (see CHECK_READS): cross-field checks on what parsed."""

    name: str = Field("model", min_length=1, max_length=200)
    """A short name used in reports and file names."""
    vocab_size: int = Field(gt=0, le=MAX_VOCAB)
    """Tokens in the vocabulary (256 for the bundled byte-level corpus)."""
    d_model: int = Field(gt=0, le=MAX_WIDTH)
    """Residual stream width."""
    n_layers: int = Field(gt=0, le=MAX_LAYERS)
    """Number of transformer blocks."""
    seq_len: int = Field(gt=0, le=MAX_SEQ)
    """Context length used for training and for attention FLOPs."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    init_std: float = Field(0.02, gt=0, le=10)
    """Standard deviation of the normal initialization of weights."""
    norm: NormSpec = NormSpec()
    """Normalization used before attention, before the FFN, and at the end (pre-norm)."""
    positions: PositionsSpec = RopeSpec()
    """Position information: rope, learned or none."""
    attention: AttentionSpec
    """Attention block (kind: mha | gqa | mla)."""
    ffn: FFNSpec
    """Dense feed-forward block; its activation is used by the experts too."""
    moe: MoESpec | None = None
    """Mixture-of-Experts layers; omit for a dense model."""

    # --------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.attention.head_dim or self.d_model // self.attention.n_heads

    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None:
            return False
        if self.moe.layers is not None:
            return i in self.moe.layers
        return i >= self.moe.first_dense and (i - self.moe.first_dense) % self.moe.every == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

    @property
    def moe_derived(self) -> MoEDerived | None:
        moe = self.moe
        if moe is None:
            return None
        if moe.paper is None:
            assert moe.routed_experts is not None and moe.top_k is not None
            hidden = moe.expert_hidden or self.ffn.hidden
            return MoEDerived(
                routed_experts=moe.routed_experts,
                shared_experts=moe.shared_experts or 0,
                top_k=moe.top_k,
                expert_hidden=hidden,
                shared_hidden=moe.shared_hidden or hidden,
                m=None,
            )
        p = moe.paper
        hidden = (p.standard_hidden or self.ffn.hidden) // p.m
        return MoEDerived(
            routed_experts=p.m * p.experts - p.shared,
            shared_experts=p.shared,
            top_k=p.m * p.top_k - p.shared,
            expert_hidden=hidden,
            shared_hidden=moe.shared_hidden or hidden,
            m=p.m,
        )

    # -------------------------------------------------------------------------------- checks
    @model_validator(mode="after")
    def _cross_field(self) -> ModelSpec:
        """Checks across sections; all problems at once, one line each (the loader locates each key)."""
        problems: list[str] = []
        att = self.attention
        if att.head_dim is None and self.d_model % att.n_heads:
            problems.append(
                f"attention.n_heads: {att.n_heads} does not divide d_model {self.d_model}; "
                "choose a divisor or give attention.head_dim"
            )
        elif isinstance(att, MLASpec):
            if isinstance(self.positions, RopeSpec) and att.qk_rope_head_dim % 2:
                problems.append(
                    f"attention.qk_rope_head_dim: rope needs an even width, got {att.qk_rope_head_dim}"
                )
        elif isinstance(self.positions, RopeSpec) and self.head_dim % 2:
            problems.append(
                f"attention.head_dim: rope needs an even head dim, got {self.head_dim}; "
                "give an even attention.head_dim or change n_heads"
            )
        if self.moe is not None:
            problems += self._moe_problems(self.moe)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _moe_problems(self, moe: MoESpec) -> list[str]:
        problems: list[str] = []
        if moe.layers is not None and any(i >= self.n_layers for i in moe.layers):
            problems.append(
                f"moe.layers: {list(moe.layers)} has indices past the last layer; "
                f"use indices from 0 to {self.n_layers - 1} (n_layers is {self.n_layers})"
            )
        if not self.moe_layers:
            problems.append(
                f"moe.first_dense: {moe.first_dense} leaves no MoE layer among {self.n_layers}; "
                "lower it or remove the moe section"
            )
        before_paper = len(problems)
        if moe.paper is not None:
            p = moe.paper
            standard = p.standard_hidden or self.ffn.hidden
            if standard % p.m:
                problems.append(
                    f"moe.paper.m: {p.m} does not divide the standard expert width {standard}; "
                    f"pick m among the divisors of {standard}"
                )
            if p.top_k > p.experts:
                problems.append(f"moe.paper.top_k: {p.top_k} > experts {p.experts}; top_k must be <= experts")
            if p.shared >= p.m * p.top_k:
                problems.append(
                    f"moe.paper.shared: K_s={p.shared} leaves no routed expert per token "
                    f"(m*K = {p.m * p.top_k}); use fewer shared experts"
                )
        if len(problems) > before_paper:
            return problems  # an impossible paper form: the derived numbers below would be meaningless
        d = self.moe_derived
        assert d is not None
        if moe.paper is not None:
            # Both forms written: each fine-grained number given must equal the derived one.
            for key, given, derived in (
                ("routed_experts", moe.routed_experts, d.routed_experts),
                ("shared_experts", moe.shared_experts, d.shared_experts),
                ("top_k", moe.top_k, d.top_k),
                ("expert_hidden", moe.expert_hidden, d.expert_hidden),
            ):
                if given is not None and given != derived:
                    problems.append(
                        f"moe.{key}: {given} contradicts the paper form, which gives {derived} "
                        f"(m={moe.paper.m}, N={moe.paper.experts}, K={moe.paper.top_k}, "
                        f"K_s={moe.paper.shared}); remove one of them"
                    )
        if d.top_k > d.routed_experts:
            problems.append(
                f"moe.top_k: {d.top_k} > routed experts {d.routed_experts}; top_k must be <= routed_experts"
            )
        g = moe.gate
        if d.routed_experts % g.n_group:
            problems.append(
                f"moe.gate.n_group: {g.n_group} does not divide the {d.routed_experts} routed experts; "
                f"pick a divisor of {d.routed_experts}"
            )
        if g.topk_group > g.n_group:
            problems.append(f"moe.gate.topk_group: {g.topk_group} > n_group {g.n_group}; use at most n_group")
        if d.top_k <= d.routed_experts and d.top_k > g.topk_group * (d.routed_experts // g.n_group):
            problems.append(
                f"moe.gate.topk_group: {g.topk_group} groups of {d.routed_experts // g.n_group} experts "
                f"hold fewer than top_k={d.top_k}; allow more groups"
            )
        if g.selection_bias and g.n_group > 1 and d.routed_experts // g.n_group < 2:
            problems.append(
                "moe.gate.n_group: a biased group score sums each group's two best; use >= 2 per group"
            )
        if g.bias_update_speed and not g.selection_bias:
            problems.append("moe.gate.bias_update_speed: set selection_bias: true for the bias to be updated")
        if moe.shared_gate and not d.shared_experts:
            problems.append("moe.shared_gate: there is no shared expert to gate; set shared_experts")
        groups = moe.balance.device_groups
        if d.routed_experts % groups:
            problems.append(
                f"moe.balance.device_groups: {groups} does not divide the {d.routed_experts} routed experts; "
                f"pick a divisor of {d.routed_experts}"
            )
        return problems
