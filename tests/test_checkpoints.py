"""Tests for model/checkpoint.py and model/args.py: every checkpoint format read back exactly, run by our
forward (model/transformer.py), and compared with transformers' LlamaForCausalLM (a reference no one here wrote).

  - ModelArgs of the published Llama-3.1 8B and 70B params.json: FFN size and bytes per layer.
  - Meta two-shard checkpoint: shards merge to the exact full state dict; log-softmax equals the HF
    reference within 1e-4 over 128 tokens, where Llama-3.1 RoPE scaling matters (checked: dropping it
    moves the output by far more than the tolerance); prefill + token-by-token decode through the KV
    cache equals the full-sequence reference.
  - HF safetensors (single file, two shards + index, tied embeddings, transformers-5 ``rope_parameters``
    config) with llama3 rope scaling: against ``LlamaForCausalLM.from_pretrained`` of the same directory.
  - GGUF (f32, llama.cpp names): against ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``.
  - Bad input: each error names the file and what was expected or found.

Everything is tiny, CPU and fp32 (tolerance: 1e-4 max abs on log-probabilities); the file runs in seconds.

Run: python -m pytest -q tests/test_checkpoints.py
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from ckpt_writers import HF_SCALING, hf_reference_logits, shard_dim, write_gguf, write_hf, write_meta

from model.args import ModelArgs
from model.checkpoint import GGUFCheckpoint, HFCheckpoint, MetaCheckpoint, open_checkpoint
from model.errors import CheckpointError, ConfigError
from model.passes import DictSource, forward_groups
from model.transformer import Queries, Rope, state_dict_groups
from runtime.engine.kv import KVCache

TOL = 1e-4
META_LEN = 128  # scaling (original context 8192) moves log-probs by ~0.3 here at head_dim 32, >> TOL
HF_LEN = 64  # twice the tiny original context of 32: scaling moves log-probs by ~5


# ---- helpers -----------------------------------------------------------------------------------------

def tokens_for(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def build(args: ModelArgs, sd: dict[str, torch.Tensor]):
    """Our model over a full state dict, every key of the schema checked (strictly: none missing, none extra)."""
    source = DictSource(state_dict_groups(args, sd))
    return lambda tokens, start, rope, cache: forward_groups(tokens, Queries(start), args, source, rope, cache)


def our_logprobs(args: ModelArgs, sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence forward of our model: (1, S, vocab) log-probabilities."""
    n = tokens.shape[1]
    return build(args, sd)(tokens, 0, Rope(args, n), KVCache(args, 1, n, torch.float32, "cpu")).log_softmax(-1)


def incremental_logprobs(args: ModelArgs, sd: dict[str, torch.Tensor], tokens: torch.Tensor,
                         prefill: int) -> torch.Tensor:
    """Prefill ``tokens[:, :prefill]``, then decode the rest one token at a time through one KVCache."""
    n = tokens.shape[1]
    model, rope, cache = build(args, sd), Rope(args, n), KVCache(args, 1, n, torch.float32, "cpu")
    outs = [model(tokens[:, :prefill], 0, rope, cache)]
    for pos in range(prefill, n):
        outs.append(model(tokens[:, pos:pos + 1], pos, rope, cache))
    return torch.cat(outs, dim=1).log_softmax(-1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same_state_dict(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"tensors differ from what was written: {bad}"


def assert_scaling_matters(args: ModelArgs, sd: dict[str, torch.Tensor], tokens: torch.Tensor,
                           ref: torch.Tensor) -> None:
    """The comparison would catch a loader that dropped the RoPE scaling."""
    assert args.rope_scaling is not None
    unscaled = our_logprobs(dataclasses.replace(args, rope_scaling=None), sd, tokens)
    assert max_diff(unscaled, ref) > 100 * TOL


def hf_from_pretrained(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                **kwargs).eval()


def hf_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float().log_softmax(-1)


# ---- published shapes --------------------------------------------------------------------------------

LLAMA31_8B = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}
LLAMA31_70B = {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8,
               "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
               "vocab_size": 128256}


@pytest.mark.parametrize("params, ffn_hidden, gb", [(LLAMA31_8B, 14336, 0.436), (LLAMA31_70B, 28672, 1.711)])
def test_published_llama31_args(tmp_path, params, ffn_hidden, gb):
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = ModelArgs.from_params_json(tmp_path / "params.json")
    assert args.ffn_hidden == ffn_hidden
    assert round(args.layer_bytes("bf16") / 1e9, 3) == gb
    assert args.head_dim == 128 and args.n_rep == params["n_heads"] // 8
    assert args.rope_scaling is not None and args.rope_scaling.factor == 8.0


# ---- Meta --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def meta_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta")
    params, full = write_meta(path, n_shards=2)
    return path, params, full


def test_meta_shards_are_really_split(meta_ckpt):
    path, _, full = meta_ckpt
    shard = torch.load(path / "consolidated.01.pth", weights_only=True)
    for key, t in full.items():
        d = shard_dim(key)
        want = tuple(t.shape) if d is None else tuple(t.shape[:d]) + (t.shape[d] // 2,) + tuple(t.shape[d + 1:])
        assert tuple(shard[key].shape) == want, key


def test_meta_merge_exact(meta_ckpt):
    path, params, full = meta_ckpt
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, MetaCheckpoint)
    assert ckpt.args == ModelArgs.from_params(params)
    assert_same_state_dict(ckpt.state_dict(), full)


def test_meta_matches_hf_reference(meta_ckpt):
    path, _, _ = meta_ckpt
    ckpt = open_checkpoint(path)
    sd, tokens = ckpt.state_dict(), tokens_for(META_LEN, ckpt.args.vocab_size)
    ref = hf_reference_logits(ckpt.args, sd, tokens)
    assert max_diff(our_logprobs(ckpt.args, sd, tokens), ref) < TOL
    assert_scaling_matters(ckpt.args, sd, tokens, ref)


def test_meta_incremental_decode_matches_reference(meta_ckpt):
    path, _, _ = meta_ckpt
    ckpt = open_checkpoint(path)
    sd, tokens = ckpt.state_dict(), tokens_for(META_LEN, ckpt.args.vocab_size, seed=2)
    ref = hf_reference_logits(ckpt.args, sd, tokens)
    assert max_diff(incremental_logprobs(ckpt.args, sd, tokens, prefill=META_LEN - 40), ref) < TOL


# ---- Hugging Face ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharded, tie", [(False, False), (True, False), (False, True)],
                         ids=["single", "sharded", "tied"])
def test_hf_matches_transformers(tmp_path, sharded, tie):
    full = write_hf(tmp_path, sharded=sharded, tie=tie)
    ckpt = open_checkpoint(tmp_path)
    assert isinstance(ckpt, HFCheckpoint)
    assert ckpt.args.rope_scaling == HF_SCALING and ckpt.args.tie_embeddings == tie
    sd = ckpt.state_dict()
    assert_same_state_dict(sd, full)  # q/k rows un-permuted back to Meta's order
    tokens = tokens_for(HF_LEN, ckpt.args.vocab_size)
    ref = hf_logprobs(hf_from_pretrained(tmp_path), tokens)
    assert max_diff(our_logprobs(ckpt.args, sd, tokens), ref) < TOL
    assert_scaling_matters(ckpt.args, sd, tokens, ref)


def test_hf_config_saved_by_transformers5_keeps_scaling(tmp_path):
    """transformers >= 5 writes rope scaling under ``rope_parameters``, not ``rope_scaling``."""
    from transformers import LlamaConfig

    full = write_hf(tmp_path)
    LlamaConfig.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in saved and saved["rope_parameters"]["rope_type"] == "llama3"
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.args.rope_scaling == HF_SCALING
    tokens = tokens_for(HF_LEN, ckpt.args.vocab_size)
    ref = hf_logprobs(hf_from_pretrained(tmp_path), tokens)
    assert max_diff(our_logprobs(ckpt.args, full, tokens), ref) < TOL


def test_hf_without_scaling(tmp_path):
    full = write_hf(tmp_path, rope_scaling=False)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.args.rope_scaling is None
    tokens = tokens_for(HF_LEN, ckpt.args.vocab_size)
    assert max_diff(our_logprobs(ckpt.args, full, tokens), hf_logprobs(hf_from_pretrained(tmp_path), tokens)) < TOL


# ---- GGUF --------------------------------------------------------------------------------------------

def test_gguf_matches_transformers(tmp_path):
    full = write_gguf(tmp_path / "tiny.gguf")
    ckpt = open_checkpoint(tmp_path / "tiny.gguf")
    assert isinstance(ckpt, GGUFCheckpoint)
    assert ckpt.args.rope_scaling is None and not ckpt.args.tie_embeddings
    sd = ckpt.state_dict()
    assert_same_state_dict(sd, full)
    tokens = tokens_for(HF_LEN, ckpt.args.vocab_size)
    ref = hf_logprobs(hf_from_pretrained(tmp_path, gguf_file="tiny.gguf"), tokens)
    assert max_diff(our_logprobs(ckpt.args, sd, tokens), ref) < TOL


# ---- bad input ---------------------------------------------------------------------------------------

def edit_params(path: Path, **changes) -> Path:
    """Rewrite params.json with ``changes``; returns its path."""
    f = path / "params.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return f


def truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])


def raises(path: Path, *fragments: str, error=CheckpointError) -> str:
    """open_checkpoint(path) and read every tensor; the error message must contain every fragment."""
    with pytest.raises(error) as e:
        open_checkpoint(path).state_dict()
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


def test_meta_without_shards(tmp_path):
    write_meta(tmp_path)
    for f in tmp_path.glob("*.pth"):
        f.unlink()
    raises(tmp_path, str(tmp_path), "no consolidated.*.pth")


def test_meta_shard_gap(tmp_path):
    write_meta(tmp_path, n_shards=2)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    raises(tmp_path, str(tmp_path), "consolidated.01.pth", "consolidated.02.pth")


@pytest.mark.parametrize("changes, fragments", [
    ({"n_expert": 8}, ["unknown key", "'n_expert'"]),
    ({"use_scaled_rope": False, "rope_scaling_factor": 8.0}, ["rope_scaling_factor=8.0", "use_scaled_rope=False"]),
    ({"n_heads": 5}, ["dim 128", "n_heads 5"]),
    ({"n_kv_heads": 3}, ["n_heads 4", "n_kv_heads 3"]),
], ids=["unknown-key", "scaling-factor-without-scaling", "heads-vs-dim", "kv-heads-vs-heads"])
def test_meta_bad_params(tmp_path, changes, fragments):
    write_meta(tmp_path)
    f = edit_params(tmp_path, **changes)
    raises(tmp_path, str(f), *fragments)
    with pytest.raises(ConfigError, match="params.json"):
        ModelArgs.from_params_json(f)


def test_meta_truncated_shard(tmp_path):
    write_meta(tmp_path)
    truncate(tmp_path / "consolidated.01.pth")
    raises(tmp_path, str(tmp_path / "consolidated.01.pth"), "not a readable PyTorch checkpoint")


def test_hf_truncated_safetensors(tmp_path):
    write_hf(tmp_path)
    truncate(tmp_path / "model.safetensors")
    raises(tmp_path, str(tmp_path / "model.safetensors"), "not a readable safetensors file")


def test_hf_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    write_hf(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f))
    raises(tmp_path, str(tmp_path), "model.layers.1.mlp.up_proj.weight", "layers.1.feed_forward.w3.weight")


def test_hf_unsupported_architecture(tmp_path):
    write_hf(tmp_path)
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "architectures": ["DeepseekV3ForCausalLM"],
                             "model_type": "deepseek_v3"}))
    raises(tmp_path, str(f), "DeepseekV3ForCausalLM", "not supported", "LlamaForCausalLM, Qwen2ForCausalLM, "
           "Qwen3ForCausalLM, MistralForCausalLM")


def test_gguf_unsupported_architecture(tmp_path):
    f = tmp_path / "tiny.gguf"
    write_gguf(f, arch="gpt2")
    raises(f, str(f), "'gpt2'", "not supported", "llama, qwen2, qwen3")


def test_gguf_truncated(tmp_path):
    f = tmp_path / "tiny.gguf"
    write_gguf(f)
    truncate(f)
    raises(f, str(f), "not a readable GGUF file")
