"""benchmarks/synth_gguf.py, the synthetic GGUF given to llama.cpp and to us side by side (issues 27 and 28): on the
tiny preset cut to 2 layers (rows of 256 and 896 values, so llama.cpp's fallbacks for rows that are not a
multiple of 256 show), the gguf package reads back llama.cpp's Q4_K_M mix with the right shapes, every block
dequantizes to finite weights of std about 0.02, the vocabulary is the preset's size; our packer keeps the blocks
and a 2-token greedy run on the CPU works. benchmarks/peer_compare.py's prompt has the asked length and its table
joins both tools' JSON. The llama.cpp side (llama-bench loading such a file) is checked by benchmarks/gpu_peer.sh,
where llama.cpp is built."""

from __future__ import annotations

import dataclasses
import json
import sys

import gguf
import numpy as np
import pytest
from conftest import ROOT
from test_streaming import reference

sys.path.insert(0, str(ROOT))
from benchmarks.peer_compare import make_prompt, table, table_rows  # noqa: E402
from benchmarks.synth_gguf import main, use_more_bits, vocabulary  # noqa: E402
from model.args import preset  # noqa: E402
from model.checkpoint import open_checkpoint  # noqa: E402
from runtime.format.image import Image, WeightFormat  # noqa: E402
from runtime.format.pack import pack  # noqa: E402

ARGS = preset("tiny", 2)  # dim 256, 8 heads (2 for k/v), ffn 896, vocab 512
# llama.cpp's Q4_K_M for 2 layers: use_more_bits picks layer 1 only; ffn_down's rows (896 values) fall back
# (Q4_K -> Q5_0, Q6_K -> Q8_0)
Q4_K_M = {"token_embd": "Q4_K", "output": "Q6_K", "output_norm": "F32", "rope_freqs": "F32",
          "blk.0.attn_v": "Q4_K", "blk.1.attn_v": "Q6_K", "blk.0.ffn_down": "Q5_0", "blk.1.ffn_down": "Q8_0",
          **{f"blk.{i}.{m}": "Q4_K" for i in range(2) for m in ("attn_q", "attn_k", "attn_output", "ffn_gate",
                                                                 "ffn_up")},
          **{f"blk.{i}.{n}": "F32" for i in range(2) for n in ("attn_norm", "ffn_norm")}}


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "tiny.gguf"
    info = path.with_suffix(".json")
    assert main(["--preset", "tiny", "--layers", "2", "--type", "q4_k_m", "--out", str(path), "--info-json",
                 str(info)]) == 0
    r = json.loads(info.read_text())
    embd = 512 * 256 // 256 * 144  # token_embd Q4_K: 512 rows of one 144-byte block
    assert r["bytes"] == path.stat().st_size and r["n_layers"] == 2
    assert r["step_bytes"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2) - embd
    return path


def test_use_more_bits_is_llama_cpps():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                                30, 31]


def test_q4_k_m_mix_shapes_and_values(q4_k_m):
    r = gguf.GGUFReader(q4_k_m)
    types = {t.name.removesuffix(".weight"): t.tensor_type.name for t in r.tensors}
    assert types == Q4_K_M
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}  # ggml order: (cols, rows)
    assert shapes["token_embd.weight"] == (256, 512) and shapes["blk.1.attn_v.weight"] == (256, 64)
    assert shapes["blk.0.ffn_down.weight"] == (896, 256) and shapes["rope_freqs.weight"] == (16,)
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(w).all(), t.name
        if t.tensor_type.name != "F32":
            assert 0.015 < float(w.std()) < 0.025 and abs(float(w.mean())) < 0.003, t.name
    assert r.fields["llama.block_count"].contents() == 2
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == ARGS.vocab_size
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


@pytest.mark.parametrize("kind,want", [("q8_0", "Q8_0"), ("bf16", "BF16")])
def test_uniform_types(kind, want, tmp_path):
    path = tmp_path / f"{kind}.gguf"
    assert main(["--preset", "tiny", "--layers", "1", "--type", kind, "--out", str(path)]) == 0
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    assert types == {want}
    w = gguf.quants.dequantize(gguf.GGUFReader(path).get_tensor(1).data, gguf.GGMLQuantizationType[want])
    assert np.isfinite(w).all() and 0.015 < float(w.std()) < 0.025


def test_vocabulary_merges_are_tokens():
    tokens, types, merges = vocabulary(70_000)  # past the 65536 two-character merges: three-character ones too
    assert len(tokens) == len(set(tokens)) == len(types) == 70_000 and len(merges) == 70_000 - 258
    vocab = set(tokens)
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in (m.split(" ") for m in merges))
    assert types[-2:] == [int(gguf.TokenType.CONTROL)] * 2 and max(map(len, tokens[:-2])) == 3


def test_packs_with_blocks_kept_and_runs(q4_k_m, tmp_path):
    ck = open_checkpoint(q4_k_m)
    assert ck.args.rope_scaling is not None and ck.args.ffn_hidden == ARGS.ffn_hidden  # rope_freqs recognised
    pack(ck, tmp_path / "t.img", dtype=WeightFormat("fp32", keep_blocks=True), quiet=True)  # blocks kept, as by the CLI
    image = Image.open(tmp_path / "t.img")
    assert set(f for f, _ in image.formats().values()) == {"q4_k", "q6_k", "q5_0", "q8_0"}
    tokens, logits = reference(image, [510, 40, 41, 300], 2)
    assert len(tokens) == 2 and bool(logits.isfinite().all())


def test_prompt_has_the_asked_length(q4_k_m):
    text, n = make_prompt(q4_k_m, 64)
    assert n == 64 and "\n" not in text


def test_peer_table_joins_both_tools(tmp_path):
    """benchmarks/peer_compare.py's table from the JSON keys each tool writes (our bench's --out-json, llama-bench's
    -o json rows), the measured copy bandwidth and the file's bytes."""
    files = {"hbm.json": {"gbps": 3000.0, "device": "NVIDIA H100 80GB HBM3"},
             "weights-8b-q4km.json": {"bytes": 4.9e9, "step_bytes": 4.5e9, "n_layers": 32},
             "ours-8b-q4km-gpu.json": {"decode_tokens_total": 63, "batch_size": 1, "decode_ms": 630.0,
                                       "prefill_tokens_total": 512, "prefill_ms": 256.0,
                                       "bound": {"step_ms": None, "limited_by": None}},
             "lcpp-8b-q4km-gpu.json": [{"n_prompt": 512, "n_gen": 0, "avg_ts": 1024.0, "flash_attn": 0},
                                       {"n_prompt": 0, "n_gen": 64, "avg_ts": 50.0, "flash_attn": 0}],
             "ours-70b-q4km-split.json": {"decode_tokens_total": 63, "batch_size": 1, "decode_ms": 12600.0,
                                          "prefill_tokens_total": 512, "prefill_ms": 700.0,
                                          "bound": {"step_ms": 145.9, "limited_by": "h2d"}}}
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
    rows = table_rows(tmp_path)
    assert rows[0] == ["8B-shaped x32 Q4_K_M", "4.90", "gpu", "0", "100.0", "2000.0", "50.0", "1024.0", "2.00", "1.95",
                       "1.50", "6.67", "13.33"]  # bound 4.5 GB / 3000 GB/s; steps 10 ms and 20 ms
    assert rows[1][:4] == ["70B-shaped Q4_K_M", "-", "split", "-"] and rows[1][10:] == ["145.90 (h2d)", "1.37",
                                                                                             "-"]
    assert "3000 GB/s" in table(tmp_path)


# ---- mixtures of experts (issue 29: benchmarks/gpu_moe.sh) ------------------------------------------------------

# llama.cpp's Q4_K_M for 2 layers of a mixture (use_more_bits picks layer 1): with 8 experts (Mixtral) attn_k and
# attn_v Q8_0, attn_output Q5_K; ffn_down_exps as ffn_down; the router F32
MOE_TYPES = {
    "mixtral-8x7b": {"attn_q": ("Q4_K", "Q4_K"), "attn_k": ("Q8_0", "Q8_0"), "attn_v": ("Q8_0", "Q8_0"),
                     "attn_output": ("Q5_K", "Q5_K"), "ffn_gate_inp": ("F32", "F32"),
                     "ffn_gate_exps": ("Q4_K", "Q4_K"), "ffn_up_exps": ("Q4_K", "Q4_K"),
                     "ffn_down_exps": ("Q4_K", "Q6_K")},
    "qwen3-235b-a22b": {"attn_q": ("Q4_K", "Q4_K"), "attn_k": ("Q4_K", "Q4_K"), "attn_v": ("Q4_K", "Q6_K"),
                        "attn_output": ("Q4_K", "Q4_K"), "ffn_gate_inp": ("F32", "F32"),
                        "attn_q_norm": ("F32", "F32"), "attn_k_norm": ("F32", "F32"),
                        "ffn_gate_exps": ("Q4_K", "Q4_K"), "ffn_up_exps": ("Q4_K", "Q4_K"),
                        "ffn_down_exps": ("Q4_K", "Q6_K")},
}


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """preset -> (GGUF, its --info-json, Mixtral's: the image packed from it with blocks kept), each the preset --tiny
    cut to 2 layers, written once (Qwen3-MoE's 256 experts not packed: their dequantization on the CPU takes
    seconds; benchmarks/gpu_moe.sh's dry run packs and runs it)."""
    out = {}
    for name in MOE_TYPES:
        d = tmp_path_factory.mktemp(name)
        path, info = d / "m.gguf", d / "m.json"
        assert main(["--preset", name, "--tiny", "--layers", "2", "--type", "q4_k_m", "--out", str(path),
                     "--info-json", str(info)]) == 0
        image = None
        if name == "mixtral-8x7b":
            pack(open_checkpoint(path), d / "m.img", dtype=WeightFormat("fp32", keep_blocks=True), quiet=True)
            image = Image.open(d / "m.img")
        out[name] = path, json.loads(info.read_text()), image
    return out


@pytest.mark.parametrize("name", sorted(MOE_TYPES))
def test_moe_presets_as_llama_cpp_writes_them(moe_files, name):
    """Stacked experts (ggml shape (cols, rows, n_experts)) under llama.cpp's architecture name and keys, its Q4_K_M
    expert rules; our reader sees the mixture (experts, top-k, head_dim, q/k norms); the --info-json sizes add up to
    the file's matrices; Mixtral's packed with blocks kept (each expert its own group): a 2-token greedy run works."""
    from model.groups import routed_groups

    path, info, image = moe_files[name]
    r = gguf.GGUFReader(path)
    arch = {"mixtral-8x7b": "llama", "qwen3-235b-a22b": "qwen3moe"}[name]
    experts, used = {"mixtral-8x7b": (8, 2), "qwen3-235b-a22b": (128, 8)}[name]
    assert r.fields["general.architecture"].contents() == arch
    assert (r.fields[f"{arch}.expert_count"].contents(), r.fields[f"{arch}.expert_used_count"].contents()) == (
        experts, used)
    types = {t.name.removesuffix(".weight"): t.tensor_type.name for t in r.tensors}
    for short, want in MOE_TYPES[name].items():
        assert (types[f"blk.0.{short}"], types[f"blk.1.{short}"]) == want, short
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (256, 256, experts)
    assert shapes["blk.1.ffn_down_exps.weight"] == (256, 256, experts)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (256, experts)
    matrices = sum(int(t.n_bytes) for t in r.tensors if len(t.shape) > 1)
    assert matrices == sum(info["layer_bytes"]) + sum(info["expert_bytes"]) + info["token_embd_bytes"] + info[
        "output_bytes"]
    ck = open_checkpoint(path)
    a = ck.args
    assert (a.arch, a.n_experts, a.n_experts_used, a.ffn_hidden) == (
        {"llama": "mixtral", "qwen3moe": "qwen3_moe"}[arch], experts, used, 256)
    if name == "qwen3-235b-a22b":
        assert r.fields["qwen3moe.expert_feed_forward_length"].contents() == 256
        assert a.qk_norm and a.head_dim == 128 and a.n_heads * a.head_dim != a.dim  # as the real model's
        assert shapes["blk.0.attn_q_norm.weight"] == (128,)
    assert len(routed_groups(a)) == 2 * experts
    if image is not None:
        assert {f for f, _ in image.formats().values()} == {"q4_k", "q5_k", "q6_k", "q8_0"}
        tokens, logits = reference(image, [510, 40, 41, 300], 2)
        assert len(tokens) == 2 and bool(logits.isfinite().all())


def test_moe_plan_of_each_side():
    """moe_compare.py plan: llama.cpp's --n-cpu-moe for the real Qwen3-235B-A22B Q4_K_M (142 GB) is the fewest first
    layers whose experts stay on the CPU for the rest to fit 22 GB, and a file of 8 of its 94 layers keeps the same
    share of its layers' experts there; a whole Mixtral file takes the whole model's."""
    from benchmarks.moe_compare import make_plan, n_cpu_moe
    from benchmarks.synth_gguf import file_sizes

    sizes = {"layer_bytes": [1, 1, 1], "expert_bytes": [10, 20, 30], "output_bytes": 5}
    assert [n_cpu_moe(sizes, gb) for gb in (100, 68, 58, 57, 38, 37, 8)] == [0, 0, 1, 2, 2, 3, 3]
    whole = file_sizes(preset("qwen3-235b-a22b"), "q4_k_m")
    p = make_plan(file_sizes(preset("qwen3-235b-a22b", 8), "q4_k_m"), "qwen3-235b-a22b", "q4_k_m", None, 24.0, 22.0,
                  [1], 96)
    m = p["n_cpu_moe_full"]
    assert 140e9 < p["full_bytes"] < 144e9 and p["lcpp_gpu_bytes_full"] <= 22e9 < p["lcpp_gpu_bytes_full"] + \
        whole["expert_bytes"][m - 1]
    assert p["n_cpu_moe"] == 8 - round((94 - m) * 8 / 94) and p["caps"] == {}
    mx = make_plan(file_sizes(preset("mixtral-8x7b"), "q4_k_m"), "mixtral-8x7b", "q4_k_m", None, 24.0, 22.0, [1], 96)
    assert mx["n_cpu_moe"] == mx["n_cpu_moe_full"] > 0 and mx["layers"] == mx["full_layers"] == 32


def test_moe_emulated_cap(moe_files):
    """Our cap for a file of 2 of a mixture's 20 layers (the --tiny Mixtral shape; Qwen3-235B-A22B's 94 plan the same
    way, only slower): the whole model's groups take the sizes of a layer of the file with the same Q4_K_M mix; the
    cap is the card less the missing layers' share of what the whole model's plan keeps resident and of its KV
    cache."""
    from benchmarks.moe_compare import emulated_cap, whole_model_sizes
    from model.groups import group_names

    image = moe_files["mixtral-8x7b"][2]
    sizes = whole_model_sizes(image, 20)
    assert set(sizes) == set(group_names(dataclasses.replace(image.args, n_layers=20)))
    g = image.groups
    assert sizes["layers.19.attention"] == g["layers.1.attention"].size  # use_more_bits: the last layers
    assert sizes["layers.5.expert.7"] == g["layers.0.expert.7"].size != g["layers.1.expert.7"].size
    cap = emulated_cap(image, 20, 0.285, 1, 96)
    assert cap["emulated"] and 0 < cap["whole_resident_layer_bytes"] <= 0.285e9
    assert 0 < cap["whole_gpu_experts"] < cap["whole_experts"] == 20 * 8
    assert cap["gpu_mem_gb"] == round(0.285 - (18 / 20) * (cap["whole_resident_layer_bytes"] + cap["whole_kv_bytes"])
                                      / 1e9, 3)
    assert emulated_cap(image, 2, 24.0, 1, 96) == {"gpu_mem_gb": 24.0, "emulated": False}


def test_moe_table_joins_both_tools(tmp_path):
    """moe_compare.py's table from our bench's JSON (its experts.bound_moved), llama-bench's rows (tg as batch 1,
    ppB as batch B) and the plan: step/bound, ours/llama.cpp, and the whole model's tokens/s extrapolated x N / L."""
    from benchmarks.moe_compare import table, table_rows

    def ours(b: int, decode_ms: float, bound_ms: float) -> dict:
        return {"batch_size": b, "decode_tokens_total": 31 * b, "decode_ms": decode_ms,
                "experts": {"hit_rate": {"gpu": 0.25, "dram": 0.75, "disk": 0.0},
                            "bound_moved": {"step_ms": bound_ms, "limited_by": "h2d"}}}

    files = {"plan-qwen.json": {"preset": "qwen3-235b-a22b", "type": "q4_k_m", "layers": 8, "full_layers": 94,
                                "n_cpu_moe": 7, "n_cpu_moe_full": 83, "lcpp_gpu_bytes_full": 21.7e9,
                                "lcpp_gpu_bytes": 1.9e9, "lcpp_gpu_gb": 22.0,
                                "caps": {"1": {"gpu_mem_gb": 22.64, "emulated": True}}},
             "weights-qwen.json": {"bytes": 12.9e9, "n_layers": 8},
             "ours-qwen-b1.json": ours(1, 310.0, 9.0), "ours-qwen-b8.json": ours(8, 620.0, 18.0),
             "lcpp-qwen.json": [{"n_prompt": 8, "n_gen": 0, "avg_ts": 160.0}, {"n_prompt": 0, "n_gen": 32,
                                                                                "avg_ts": 50.0}]}
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
    rows = table_rows(tmp_path)
    assert rows[0] == ["Qwen3-235B-A22B-shaped x8/94 Q4_K_M 12.9 GB", "1", "22.64", "10.0", "100.0", "9.0 (h2d)",
                       "1.11", "25/75/0", "50.0 (tg, -ncmoe 7)", "2.00", "8.5", "4.3"]
    assert rows[1][:2] == ["8", "-"] or rows[1][1:5] == ["8", "-", "20.0", "400.0"]
    assert rows[1][8] == "160.0 (pp8, -ncmoe 7)" and rows[1][9] == "2.50"
    text = table(tmp_path)
    assert "EXTRAPOLATED" in text and "--n-cpu-moe 7 (whole model: 83 of 94" in text
