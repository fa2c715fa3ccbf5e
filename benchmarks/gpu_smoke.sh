#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, run the GPU tests, then a short streamed run per
# mode on a synthetic 8B-shaped image (4 layers) with a capped GPU budget. Prints a short table last.
# Usage (from the repo root, on the GPU machine): bash benchmarks/gpu_smoke.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -x -p no:cacheprovider --tb=short tests/test_streaming.py -k gpu 2>&1 | tail -30
python3 - <<'PY'
# Is the decode step slow because of cuDNN attention? Time 20 decode steps of one 8B-shaped layer, both ways.
import torch, time
from model.args import preset
from model.llama import Rope, attention_forward
from runtime.engine.kv import KVCache
a = preset("llama3.1-8b", 1); dev = "cuda"
w = {"attention.wq.weight": torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) * .02,
     "attention.wk.weight": torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16) * .02,
     "attention.wv.weight": torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16) * .02,
     "attention.wo.weight": torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) * .02,
     "attention_norm.weight": torch.ones(4096, device=dev, dtype=torch.bfloat16)}
rope, cache = Rope(a, 512, dev), KVCache(a, 1, 512, torch.bfloat16, dev)
for cudnn in (True, False):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    h = torch.randn(1, 1, 4096, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize(); t = time.perf_counter()
    for i in range(20):
        h = attention_forward(h, w, a, 0, rope, cache, 100 + i + (0 if cudnn else 100))
    torch.cuda.synchronize(); print(f"cudnn_sdp={cudnn}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms per decode step")
PY
img=/tmp/s8.img
python3 launch.py pack --synthetic llama3.1-8b --layers 4 --out $img --quiet
printf "%-8s %-40s\n" mode result > /tmp/table
for mode in full preload stream mixed; do
  python3 launch.py run --image $img --prompt-ids 128000,9906,1917,374 --max-new-tokens 16 --mode $mode \
     --gpu-mem-gb 4 --device cuda --out-json /tmp/$mode.json > /tmp/$mode.log 2>&1
  rc=$?
  python3 - "$mode" "$rc" <<'PY' >> /tmp/table
import json, sys
mode, rc = sys.argv[1], int(sys.argv[2])
try:
    r = json.load(open(f"/tmp/{mode}.json"))
    print(f"{mode:<8} rc={rc} tokens={r['output_token_ids'][:6]}... decode {r['decode_tok_s']:.1f} tok/s prefill {r['prefill_ms']:.1f} ms steps {[round(x, 1) for x in r['token_ms'][:8]]}")
except Exception as e:
    print(f"{mode:<8} rc={rc} no json ({e})")
PY
  [ $rc -ne 0 ] && tail -20 /tmp/$mode.log
done
cat /tmp/table
