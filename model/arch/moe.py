"""The mixture-of-experts decoder the registry's MoE architectures share (torch-free): the dense decoder's
attention with the FFN replaced by a router and experts (Mixtral, Qwen2-MoE, Qwen3-MoE); and the parts of reading
their config.json and GGUF metadata that they share.

    layers.{i}.attention        the dense attention group's tensors (model/arch/common.py), and
                                ffn_norm.weight                     (dim,)
                                feed_forward.gate.weight            (n_experts, dim)  the router
    layers.{i}.expert.{e}       w1.weight, w3.weight (ffn_hidden, dim), w2.weight (dim, ffn_hidden)  one expert
    layers.{i}.shared_expert    shared_expert.{w1,w2,w3}.weight (shared_ffn_hidden), shared_expert_gate.weight
                                (1, dim): run for every token, scaled by sigmoid(gate x)  (Qwen2-MoE)

The router belongs to the attention group, so a pass knows each token's experts as soon as the group is done:
its forward (model/experts.py ``moe_attention_forward``) computes softmax(gate x) and its top-k (renormalised
to sum to 1 where ``norm_topk_prob``), and each expert group then computes its own tokens only. An expert is a
group of its own, the unit the placement ranks by how often it is routed and a pass fetches only when a token chose
it (runtime/engine/placement.py, runtime/engine/streamed.py); in Hugging Face checkpoints it is
one tensor per expert (``{e}`` in the names below), in llama.cpp's GGUFs one tensor per layer stacking every
expert (``ffn_gate_exps``: (n_experts, ffn_hidden, dim)), split per expert at pack (quantized blocks too: each
expert's rows are whole rows of blocks).

The GPU tier's order (``gpu_rank``): the attention group (with the router) and the shared expert, which every token
uses, before the experts, which a token uses k of n of; the placement orders the experts among themselves by how
often they are routed.

Every layer must be a mixture: configs that mix dense FFN layers in (Qwen's ``mlp_only_layers``,
``decoder_sparse_step`` > 1) are refused by name.
"""

from __future__ import annotations

from typing import Any

from model.arch.common import ATTENTION, FEED_FORWARD
from model.arch.schema import COLS, MATRIX, ROUTER, ROWS, WHOLE, GroupKind, TensorDef
from model.errors import ConfigError

FFN_NORM = next(t for t in FEED_FORWARD.tensors if t.name == "ffn_norm.weight")


def attention_kind(router_hf: str) -> GroupKind:
    """The attention group of an MoE layer: the dense attention's tensors, the FFN norm and the router (its
    Hugging Face name ``router_hf``; llama.cpp's ``ffn_gate_inp``)."""
    router = TensorDef("feed_forward.gate.weight", lambda a: (a.n_experts, a.dim), ROUTER, WHOLE, router_hf,
                       "ffn_gate_inp.weight")
    return GroupKind("attention", "attn", forward="moe_attention", gpu_rank=0,
                     tensors=(*ATTENTION.tensors, FFN_NORM, router))


def expert_kind(hf: dict[str, str]) -> GroupKind:
    """One expert, repeated ``n_experts`` times per layer; ``hf``: w1/w2/w3 -> Hugging Face name with ``{e}``."""
    return GroupKind("expert", "exp", forward="expert", gpu_rank=2, count=lambda a: a.n_experts, tensors=(
        TensorDef("w1.weight", lambda a: (a.ffn_hidden, a.dim), MATRIX, ROWS, hf["w1"], "ffn_gate_exps.weight"),
        TensorDef("w2.weight", lambda a: (a.dim, a.ffn_hidden), MATRIX, COLS, hf["w2"], "ffn_down_exps.weight"),
        TensorDef("w3.weight", lambda a: (a.ffn_hidden, a.dim), MATRIX, ROWS, hf["w3"], "ffn_up_exps.weight"),
    ))


SHARED_EXPERT = GroupKind("shared_expert", "shexp", forward="shared_expert", gpu_rank=1, tensors=(
    TensorDef("shared_expert.w1.weight", lambda a: (a.shared_ffn_hidden, a.dim), MATRIX, ROWS,
              "mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight"),
    TensorDef("shared_expert.w2.weight", lambda a: (a.dim, a.shared_ffn_hidden), MATRIX, COLS,
              "mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight"),
    TensorDef("shared_expert.w3.weight", lambda a: (a.shared_ffn_hidden, a.dim), MATRIX, ROWS,
              "mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight"),
    TensorDef("shared_expert_gate.weight", lambda a: (1, a.dim), ROUTER, WHOLE, "mlp.shared_expert_gate.weight",
              "ffn_gate_inp_shexp.weight"),
))

QWEN_EXPERT = {"w1": "mlp.experts.{e}.gate_proj.weight", "w2": "mlp.experts.{e}.down_proj.weight",
               "w3": "mlp.experts.{e}.up_proj.weight"}

# MoE architectures transformers and llama.cpp name that this registry does not compute, and why: refused by name
UNSUPPORTED = {
    "DeepseekV2ForCausalLM": "DeepSeek-V2's multi-head latent attention (MLA) and grouped routing",
    "DeepseekV3ForCausalLM": "DeepSeek-V3's multi-head latent attention (MLA) and grouped, biased routing",
    "GptOssForCausalLM": "gpt-oss's attention sinks, biased experts and clamped SwiGLU",
    "deepseek2": "DeepSeek-V2/V3's multi-head latent attention (MLA) and grouped routing",
    "gpt-oss": "gpt-oss's attention sinks, biased experts and clamped SwiGLU",
}


# ---- config.json ---------------------------------------------------------------------------------------------

def hf_expert_args(c: dict, path: str, hidden_key: str, experts_keys: tuple[str, ...]) -> dict[str, Any]:
    """n_experts, n_experts_used and ffn_hidden (one expert's, from ``hidden_key``) of an MoE config.json, whose
    every layer must be sparse. ``experts_keys``: the expert count's names, in order of preference (Qwen's Hub
    configs say num_experts, transformers 5 saves num_local_experts); two that disagree are refused."""
    found = {k: c[k] for k in experts_keys if c.get(k) is not None}
    if not found:
        raise ConfigError(f"{path}: missing key {experts_keys[0]!r} (the number of experts)")
    if len(set(found.values())) > 1:
        raise ConfigError(f"{path}: expert counts disagree: {found}")
    for key in ("num_experts_per_tok", hidden_key):
        if key not in c:
            raise ConfigError(f"{path}: missing key {key!r}")
    if c.get("mlp_only_layers"):
        raise ConfigError(f"{path}: mlp_only_layers {c['mlp_only_layers']} mixes dense FFN layers into the mixture, "
                          f"which is not supported (every layer must be sparse)")
    if c.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(f"{path}: decoder_sparse_step {c['decoder_sparse_step']} makes some layers dense FFN "
                          f"layers, which is not supported (give 1: every layer sparse)")
    n, k = next(iter(found.values())), c["num_experts_per_tok"]
    if not (isinstance(n, int) and n >= 1 and isinstance(k, int) and 1 <= k <= n):
        raise ConfigError(f"{path}: num_experts_per_tok {k!r} must be 1 to the number of experts {n!r}")
    return dict(n_experts=n, n_experts_used=k, ffn_hidden=c[hidden_key])


# ---- GGUF metadata ---------------------------------------------------------------------------------------------

def gguf_expert_args(gg, path: str, expert_ffn_key: str | None) -> dict[str, Any]:
    """n_experts and n_experts_used of an MoE GGUF (``{arch}.expert_count``, ``expert_used_count``), and one
    expert's hidden size from ``{arch}.{expert_ffn_key}`` (None: feed_forward_length is the expert's, as in
    Mixtral's ``llama`` GGUFs)."""
    from model.errors import CheckpointError

    arch = gg.field("general.architecture")
    out = {}
    for key, name in (("n_experts", "expert_count"), ("n_experts_used", "expert_used_count"),
                      ("ffn_hidden", expert_ffn_key)):
        if name is None:
            continue
        v = gg.field(f"{arch}.{name}")
        if v is None:
            raise CheckpointError(f"{path}: GGUF metadata key {arch}.{name} missing")
        out[key] = int(v)
    return out
