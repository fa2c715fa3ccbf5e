"""The peer users pick today: Hugging Face transformers + accelerate with CPU offload, on our weights.

``to_hf(image, out_dir)`` writes a packed image as a Hugging Face Llama checkpoint (safetensors shards with
an index, config.json; q/k rows permuted to HF's order), one group at a time. ``run_peer`` loads it with
``device_map="auto"`` and ``max_memory`` at the given GPU budget (the rest offloaded to CPU RAM, as users
configure it) and times greedy decoding: seconds per token from the difference of two generate() calls
(1 and 1+N new tokens), so load and prefill are excluded. Used by benchmarks/suite.py on the GPU machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from model.args import ModelArgs
from model.checkpoint import hf_name, permute_hf
from runtime.format.image import Image, tensor_views


def hf_config(a: ModelArgs) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
           "intermediate_size": a.ffn_hidden, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
           "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim, "vocab_size": a.vocab_size,
           "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "tie_word_embeddings": a.tie_embeddings,
           "max_position_embeddings": a.max_seq_len, "hidden_act": "silu", "torch_dtype": "bfloat16",
           "bos_token_id": 0, "eos_token_id": 1}
    if a.rope_scaling:
        s = a.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    return cfg


def to_hf(image: Image, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    if (out / "model.safetensors.index.json").exists():
        return out
    a, weight_map = image.args, {}
    for i, (name, spec) in enumerate(image.groups.items()):
        prefix = name.rsplit(".", 1)[0] + "." if name.startswith("layers.") else ""
        tensors = {}
        for local, t in tensor_views(spec, image.read_group(name)).items():
            key = prefix + local
            if key.endswith("attention.wq.weight"):
                t = permute_hf(t, a.n_heads)
            elif key.endswith("attention.wk.weight"):
                t = permute_hf(t, a.n_kv_heads)
            tensors[hf_name(key)] = t.contiguous().clone()
        fname = f"model-{i:05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (out / "config.json").write_text(json.dumps(hf_config(a), indent=1))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def run_peer(image_path: Path, gpu_gb: float, new_tokens: int, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    image = Image.open(image_path)
    hf_dir = to_hf(image, image_path.with_suffix(".hf"))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), device_map="auto", dtype=torch.bfloat16,
                                                 max_memory={0: int(gpu_gb * 1e9), "cpu": 100 << 30})
    load_s = time.perf_counter() - t0
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
    x = torch.tensor([[(i * 7919 + 13) % (image.args.vocab_size - 1) + 1 for i in range(16)]], device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)  # warm-up
    t1, tn = timed(1), timed(1 + new_tokens)
    res = {"peer": "transformers + accelerate, device_map=auto, max_memory", "gpu_budget_gb": gpu_gb,
           "resident_gb": resident / 1e9, "load_s": load_s, "s_per_token": (tn - t1) / new_tokens,
           "new_tokens": new_tokens}
    (out / "peer.json").write_text(json.dumps(res, indent=1))
    return res
