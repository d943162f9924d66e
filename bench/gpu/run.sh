#!/usr/bin/env bash
# Prepared runs on a lent GPU machine (H100/H200). A device call runs at most 10 minutes, so run it in two calls:
#   STEPS=kernels_selfcheck,kernel_bench,pipeline_bench,fewstep (step limits add up to 760 s) and
#   STEPS=sd15_onnx,native_cuda (420 + 150 s). From the repository root:
#   bash bench/gpu/run.sh            # writes into $OUT (or /tmp/cg4ctr-gpu) and prints a table last
#   STEPS=sd15_onnx bash bench/gpu/run.sh   # only some steps (comma list of the step names below)
# The machine has torch, triton, transformers, onnx but not diffusers: its wheel travels in .whl/
# (with CLIP's BPE vocabulary file, bpe_simple_vocab_16e6.txt.gz, for the tokenizer).
set -uo pipefail
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/cg4ctr-gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
[ -f .whl/bpe_simple_vocab_16e6.txt.gz ] && export CG4CTR_CLIP_BPE="$PWD/.whl/bpe_simple_vocab_16e6.txt.gz"
export CG4CTR_CACHE=/tmp/cg4ctr-cache

STEPS="${STEPS:-kernels_selfcheck,kernel_bench,pipeline_bench,fewstep,sd15_onnx,native_cuda}"
step() {  # step NAME SECONDS CMD...: run with a time limit, keep its output, never stop the script
  local name=$1 limit=$2; shift 2
  case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - start))s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. Triton kernels natively vs their torch references, and full loops vs diffusers' step.
step kernels_selfcheck 90 python3 -m cg4ctr_fast.kernels.selfcheck --quick
# 2. Kernel micro-benchmark: fused vs unfused step, GB/s against the measured copy bandwidth.
step kernel_bench 90 python3 bench/kernel_bench.py --device cuda --dtype fp16 --batch 1,8,16 --json "$OUT/kernel_bench.json"
# 3. SD1.5-inpaint architecture, random fp16 weights, 512x512, 20 guided steps: diffusers eager (SDPA) vs
#    ours eager (unfused and fused step) vs ours torch.compile (CUDA graphs via reduce-overhead, channels_last).
step pipeline_bench 280 python3 -m cg4ctr_fast.cli.bench --preset sd15-inpaint --random-weights --device cuda \
  --dtype fp16 --backends torch,compile --fuse both --groups 1,8 --steps 20 --runs 3 --warmup 2 \
  --json "$OUT/pipeline_bench.json" --plot "$OUT/pipeline_bench.png"
# 3b. Few steps (issue goal: <= 150 ms on an H200): SD1.5-inpaint architecture, random fp16 weights, 512x512,
#    8 groups: 4 LCM steps without guidance, compile + fused step, with and without tiny-decoder previews
#    ranking 2 candidates per group, beside diffusers' 20 guided steps; VAE and preview decode as their own stages.
step fewstep 300 python3 bench/gpu/fewstep.py --device cuda --dtype fp16 --groups 8 --runs 5 --warmup 2 \
  --json "$OUT/fewstep.json"
# 4. The SD1.5-inpaint architecture (random weights) through `cg4ctr-export onnx` at 512x512, fp32: the UNet
#    goes over 2 GB and takes the external-data path. ONNX Runtime validates every component against torch at
#    batch 1 and 2, on the providers validation_providers() picks from those printed first.
step sd15_onnx 420 bash -c 'python3 -c "import onnxruntime as o; print(\"onnxruntime\", o.__version__, o.get_available_providers())" \
  && python3 -m cg4ctr_fast.cli.export onnx --recipe export/sd15-inpaint-cpu.toml --random-weights --out /tmp/sd15-onnx \
  && cp /tmp/sd15-onnx/validation.json "$0/sd15_onnx_validation.json" && cp /tmp/sd15-onnx/manifest.json "$0/sd15_onnx_manifest.json" \
  && du -sh /tmp/sd15-onnx/*/' "$OUT"
# 5. The native ops with their CUDA kernels: build libcg4ctr_ops against this machine's CUDA torch (needs cmake
#    >= 3.18 and nvcc, looked up on PATH then in /usr/local/cuda/bin; cmake/ninja wheels put in .whl/ land in
#    /tmp/site/bin), then each CUDA op vs its Triton kernel and the torch reference (fp16/fp32, batch 1/8,
#    blend off/on/last; exit 1 on a mismatch), the composite ops vs imaging, and native vs Triton time per op.
step native_cuda 150 bash -c 'export PATH="/tmp/site/bin:$PATH:/usr/local/cuda/bin"; nvcc --version | tail -1; \
  python3 -m cg4ctr_fast.kernels.native build --build-dir /tmp/cg4ctr-native-build && python3 -m cg4ctr_fast.kernels.native info \
  && python3 bench/gpu/native_check.py --device cuda --json "$0/native_check.json"' "$OUT"

echo "=== summary"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
for name in ("kernel_bench.json", "pipeline_bench.json", "fewstep.json"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        report = json.load(open(path))
        print(f"--- {name}")
        print(report.get("table", "(no table)"))
    else:
        print(f"--- {name}: missing (see its log)")
PY
