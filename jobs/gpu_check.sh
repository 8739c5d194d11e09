#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU and `pip install -e '.[gpu,test]'` (faiss-gpu):
# the `gpu` tests, then the memory benchmarks on the GPU at 1M / 16M / 64M slots (d = 128,
# B = 1024, k = 256). Every figure goes to one file, $1 (default gpu-check.txt); within about
# 8 minutes on an H100/H200.
#
#     bash jobs/gpu_check.sh results/gpu-check.txt
set -u
out=${1:-gpu-check.txt}
mkdir -p "$(dirname "$out")"
: > "$out"
log() { echo "$*" | tee -a "$out"; }
run() { log "\$ $*"; "$@" 2>&1 | tee -a "$out"; log "(exit ${PIPESTATUS[0]})"; }

log "# distmem GPU check, $(date -u +%FT%TZ)"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run python -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'faiss', faiss.__version__, 'faiss GPUs', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)"
run python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
# exact backends on the GPU: torch (float32, then 8-bit keys) and faiss's GPU brute force
run timeout 120 python -m jobs.bench_memory --device cuda --size 1048576 --backends torch,faiss --repeats 5
run timeout 150 python -m jobs.bench_memory --device cuda --size 16777216 --backends torch,faiss --repeats 3 --no-bare
run timeout 150 python -m jobs.bench_memory --device cuda --size 16777216 --backends torch --key-dtype int8 \
    --repeats 3 --no-bare
run timeout 240 python -m jobs.bench_memory --device cuda --size 67108864 --backends torch --key-dtype float16 \
    --repeats 3 --no-bare
# the approximate backend on a GPU memory (lists in host memory), against exact, at 1M
run timeout 120 python -m jobs.bench_memory --device cuda --backend ivf --sizes 1M --repeats 3
log "# done $(date -u +%FT%TZ)"
