#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU and distmem's requirements (`pip install -e
# '.[gpu,test]'` for the faiss GPU build; with `.[faiss,test]` the faiss GPU lines are skipped):
# the `gpu` tests, then the memory benchmarks on the GPU at 1M / 16M / 64M slots (d = 128,
# B = 1024, k = 256). Every figure goes to one file, $1 (default gpu-check.txt); within about
# 6 minutes on an H100/H200. PYTHON names the interpreter (default: python3).
#
#     bash jobs/gpu_check.sh results/gpu-check.txt
set -u
out=${1:-gpu-check.txt}
py=${PYTHON:-python3}
mkdir -p "$(dirname "$out")"
: > "$out"
log() { echo "$*" | tee -a "$out"; }
run() { log "\$ $*"; local t0=$SECONDS; "$@" 2>&1 | tee -a "$out"; log "(exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s)"; }

log "# distmem GPU check, $(date -u +%FT%TZ)"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run "$py" -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'faiss', faiss.__version__, 'faiss GPUs', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)"
# faiss's GPU backend where the installed faiss has one; the torch backend everywhere
backends=$("$py" -c "import faiss; print('torch,faiss' if getattr(faiss, 'get_num_gpus', lambda: 0)() else 'torch')")
run timeout 240 "$py" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider
# exact backends on the GPU (float32 keys, then 16-bit and 8-bit ones) against CPU faiss at 1M
run timeout 90 "$py" -m jobs.bench_memory --device cuda --size 1048576 --backends "$backends" --repeats 5
run timeout 90 "$py" -m jobs.bench_memory --device cuda --size 16777216 --backends "$backends" --repeats 3 --no-bare
run timeout 90 "$py" -m jobs.bench_memory --device cuda --size 16777216 --backends torch --key-dtype int8 \
    --repeats 3 --no-bare
run timeout 120 "$py" -m jobs.bench_memory --device cuda --size 67108864 --backends torch --key-dtype float16 \
    --repeats 3 --no-bare
# the approximate backend on a GPU memory (lists in host memory), against exact, at 1M
run timeout 150 "$py" -m jobs.bench_memory --device cuda --backend ivf --sizes 1M --repeats 3
log "# done $(date -u +%FT%TZ)"
