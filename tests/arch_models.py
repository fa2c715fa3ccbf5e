"""Tiny random checkpoints of the registry's architectures written by transformers' own classes, and the same
weights converted to GGUF the way llama.cpp's converter writes them, for tests/test_architectures.py.

Not a test module. ``CASES`` are transformers configs: Qwen2 (q/k/v biases; tied and untied embeddings), Qwen3
(per-head q/k RMSNorm, head_dim 24 over a 64-wide model) and Mistral (GQA, head_dim from the config, a sliding
window). ``write_hf`` builds the model with transformers, draws every parameter from a seeded generator (the
library's own init leaves biases at zero and norms at one, which would hide a bias or norm read from the wrong
place) and saves it with ``save_pretrained``, as the Hub stores checkpoints. ``write_gguf`` converts such a model as
llama.cpp's convert_hf_to_gguf.py does: its tensor names (its own table below, not ours), ``qwen2``/``qwen3``
GGUFs keep HF's q/k rows, ``llama`` GGUFs (Mistral) get the converter's row permutation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ckpt_writers import gguf_vocab

VOCAB = len(gguf_vocab()[0])  # 262: the GGUF's byte-level vocabulary, so one config serves both formats
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=160, max_position_embeddings=256, rms_norm_eps=1e-6, hidden_act="silu")


def case_config(name: str):
    """The transformers config of test case ``name``."""
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    if name == "qwen2-tied":
        return Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1e6)
    if name == "qwen2":
        return Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1e6)
    if name == "qwen3":
        return Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=False, rope_theta=1e6)
    if name == "mistral":  # a window longer than every test's context: runs exactly (shorter: refused)
        return MistralConfig(**COMMON, head_dim=24, sliding_window=200, tie_word_embeddings=False, rope_theta=1e4)
    raise KeyError(name)


CASES = ("qwen2-tied", "qwen2", "qwen3", "mistral")
GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}  # llama.cpp converts Mistral as llama


def moe_config(name: str, **over):
    """The transformers config of mixture-of-experts case ``name`` (tests/test_moe.py): 2 layers of 64, experts
    narrower than the dense FFN; ``over`` replaces any key."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if name == "mixtral":  # top-2 of 8, renormalised; head_dim from the config
        return MixtralConfig(**{**COMMON, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 24,
                                "tie_word_embeddings": False, "rope_theta": 1e4, **over})
    if name == "qwen3_moe":  # top-3 of 8, norm_topk_prob; per-head q/k norms
        return Qwen3MoeConfig(**{**COMMON, "num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                                 "norm_topk_prob": True, "head_dim": 24, "tie_word_embeddings": False,
                                 "rope_theta": 1e6, **over})
    if name == "qwen2_moe":  # top-2 of 6, not renormalised; a shared expert with its sigmoid gate; q/k/v biases
        return Qwen2MoeConfig(**{**COMMON, "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                 "shared_expert_intermediate_size": 96, "norm_topk_prob": False,
                                 "tie_word_embeddings": False, "rope_theta": 1e6, **over})
    raise KeyError(name)


MOE_CASES = ("mixtral", "qwen3_moe", "qwen2_moe")
MOE_GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}  # llama.cpp's names


def build_model(config, seed: int):
    """transformers' model of ``config`` in fp32, every parameter random: matrices and biases N(0, 0.1^2),
    norms 1 + N(0, 0.1^2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + 1.0 if "norm" in name else noise)
    return model.eval()


def write_hf(directory: Path, name: str, seed: int = 0, config=None):
    """save_pretrained of a random model of case ``name`` (or of ``config``); returns the model (the reference)."""
    model = build_model(config if config is not None else case_config(name), seed)
    model.save_pretrained(str(directory))
    return model


def hub_tensors(model) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the names the Hub stores (transformers 5 holds a mixture's experts fused in
    memory and splits them per expert again in save_pretrained, so that is what is read back here)."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return load_file(str(Path(d) / "model.safetensors"))


def from_hub_tensors(model, tensors: dict[str, torch.Tensor], directory: Path):
    """A transformers model of ``model``'s config holding ``tensors`` (Hub names), saved in ``directory`` and
    loaded back as any checkpoint is (transformers fuses the experts itself)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                attn_implementation="eager").eval()


# ---- GGUF, as llama.cpp's converter writes it ---------------------------------------------------------------

# llama.cpp's names (gguf-py tensor_mapping / convert_hf_to_gguf.py) for HF's, per layer and global
_LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
          "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
# a mixture's: the router and shared expert per layer; each expert's tensors stacked into one per layer, by the
# position of the expert index in the name (Mixtral's block_sparse_moe.experts.{e}.w1, Qwen's mlp.experts.{e}...)
_LAYER.update({"block_sparse_moe.gate.weight": "ffn_gate_inp.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
               "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
               "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
               "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
               "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"})
_STACKED = {"w1.weight": "ffn_gate_exps.weight", "w2.weight": "ffn_down_exps.weight", "w3.weight": "ffn_up_exps.weight",
            "gate_proj.weight": "ffn_gate_exps.weight", "down_proj.weight": "ffn_down_exps.weight",
            "up_proj.weight": "ffn_up_exps.weight"}


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows back into Meta's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _experts(c) -> int:
    return getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 0


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    c = model.config
    out, stacks = {}, {}
    for hf, t in (hub_tensors(model) if _experts(c) else model.state_dict()).items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue  # tied: the converter writes no output matrix
        a = t.detach().float().numpy()
        if hf.startswith("model.layers."):
            _, _, i, rest = hf.split(".", 3)
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                a = _llama_permute(a, c.num_attention_heads)
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                a = _llama_permute(a, c.num_key_value_heads)
            if rest == "mlp.shared_expert_gate.weight":  # (1, dim) stored as (dim,), as the Hub's GGUFs hold it
                a = a.reshape(-1)  # (transformers' GGUF reader: "quantized one is (2048)")
            if ".experts." in rest:  # ...experts.{e}.w1.weight: expert e of the layer's stack
                e, local = rest.split(".experts.", 1)[1].split(".", 1)
                stacks.setdefault(f"blk.{i}.{_STACKED[local]}", {})[int(e)] = a
                continue
            out[f"blk.{i}.{_LAYER[rest]}"] = a
        else:
            out[_GLOBAL[hf]] = a
    for name, per in stacks.items():  # (n_experts, rows, cols), as convert_hf_to_gguf.py's torch.stack
        out[name] = np.stack([per[e] for e in range(len(per))])
    return out


def from_gguf_tensors(model, tensors: dict[str, np.ndarray], arch: str):
    """A copy of ``model`` holding GGUF ``tensors`` (llama.cpp's names, dequantized), read back the way the
    converter wrote them (``gguf_tensors`` inverted): the reference for a GGUF whose values differ from the
    model's (quantized blocks)."""
    import copy

    c = model.config
    inverse = {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for i in range(c.num_hidden_layers) for h, g in _LAYER.items()}
    inverse.update({g: h for h, g in _GLOBAL.items()})
    sd = {}
    for name, a in tensors.items():
        hf = inverse[name]
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if hf.endswith("q_proj.weight") else c.num_key_value_heads
            a = a.reshape(heads, a.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)  # undo the permute
        sd[hf] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    other = copy.deepcopy(model)
    missing, unexpected = other.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return other.eval()


def _add_byte_level_vocab(w, arch: str) -> None:
    tokens, types, merges = gguf_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)


def write_gguf(path: Path, model, arch: str, vocab=None, tensors: dict[str, np.ndarray] | None = None) -> None:
    """``model`` as an f32 GGUF of llama.cpp architecture ``arch`` (its ``gguf_tensors``, or ``tensors``), with
    the byte-level test vocabulary, or the one ``vocab(writer, arch)`` adds; a tensor given as (blocks, type) is
    written in that quantized type."""
    import gguf

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None)
                         else float(c.rope_theta))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if _experts(c):  # as convert_hf_to_gguf.py: TextModel's counts, Qwen2MoeModel's expert sizes
        w.add_expert_count(_experts(c))
        w.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    (vocab or _add_byte_level_vocab)(w, arch)
    for name, a in (tensors if tensors is not None else gguf_tensors(model, arch)).items():
        if isinstance(a, tuple):  # (blocks, GGMLQuantizationType): written as they are
            w.add_tensor(name, a[0], raw_shape=a[0].shape, raw_dtype=a[1])
        else:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def with_image_weights(model, image):
    """A copy of transformers' ``model`` holding the weights of ``image`` as we compute with them (quantized ones
    dequantized), moved back to HF's names and rotate-half rows: the reference for a quantized image, whose only
    difference from the original is then the rounding of its weights."""
    import copy

    from model.checkpoint import hf_name, permute_hf, rope_heads
    from model.groups import group_prefix, tensor_def
    from runtime.engine.weights import InMemoryWeights

    args, src = image.args, InMemoryWeights(image, "cpu", quiet=True)
    sd = {}
    for g, weights in src.groups.items():
        for local, t in weights.items():
            key, heads = group_prefix(g) + local, rope_heads(tensor_def(args, local), args)
            t = t.dense() if hasattr(t, "dense") else t.float()  # a CPU run's tiled weights (model/cpu_kernels.py)
            if heads is not None:
                t = permute_hf(t.reshape(t.shape[0], -1), heads).reshape(t.shape)
            sd[hf_name(key, args)] = t
    other = copy.deepcopy(model)
    missing, unexpected = other.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return other.eval()


def hf_logits(model, tokens: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float()


def hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy continuation (no stop token: every test vocabulary id is an ordinary token here)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def run_image(image, prompt: list[int], new: int, max_len: int):
    """Our greedy tokens for ``prompt`` (``new`` of them) and the prompt's logits, the image in memory on the CPU."""
    from runtime.engine.config import SamplingConfig
    from runtime.engine.generate import Generator
    from runtime.engine.weights import InMemoryWeights

    gen = Generator(InMemoryWeights(image, "cpu", quiet=True), max_len)
    tokens = gen.generate(prompt, SamplingConfig(new)).output_token_ids
    return tokens, gen.forward(torch.tensor([prompt]), 0, gen.new_cache(1))
