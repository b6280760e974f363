#!/usr/bin/env bash
# Runs on the device machine (see docs/performance.md): installs the carried wheels, optionally runs
# the GPU-marked tests (--tests), then the full-size benchmark with the remaining arguments
# (e.g. --steps ...). Results go to $OUT. NVLink multicast stays off, as the device tool asks.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 FORENSIC_VLM_TEST_TOKENIZER=$PWD/.bench/processor
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, bitsandbytes, sklearn, torchao, liger_kernel, importlib.metadata as m, pytorch_lightning as pl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'lightning', pl.__version__, 'torchao', torchao.__version__, 'liger-kernel', m.version('liger-kernel'))"
if [ "${1:-}" = "--tests" ]; then  # GPU_TESTS="-k expr" chooses some
  shift
  python3 -m pytest -m gpu -q -p no:cacheprovider ${GPU_TESTS:-} tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
# BENCH_SECONDS: stop the steps with SIGINT after so many seconds, inside the call's own limit, so that the
# harness still compares the steps it finished and writes its JSON (a call cut at its limit does not).
timeout -s INT "${BENCH_SECONDS:-100000}" python3 benchmarks/gpu_full_scale.py --out-dir "$OUT" --processor .bench/processor "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/benchmark_log.txt" | tail -40
