"""benchmarks/synth_gguf.py, the synthetic GGUF given to llama.cpp and to us side by side (issues 27 and 28): on the
tiny preset cut to 2 layers (rows of 256 and 896 values, so llama.cpp's fallbacks for rows that are not a
multiple of 256 show), the gguf package reads back llama.cpp's Q4_K_M mix with the right shapes, every block
dequantizes to finite weights of std about 0.02, the vocabulary is the preset's size; our packer keeps the blocks
and a 2-token greedy run on the CPU works. benchmarks/peer_compare.py's prompt has the asked length and its table
joins both tools' JSON. The llama.cpp side (llama-bench loading such a file) is checked by benchmarks/gpu_peer.sh,
where llama.cpp is built."""

from __future__ import annotations

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
