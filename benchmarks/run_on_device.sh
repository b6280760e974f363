#!/usr/bin/env bash
# Runs on the device machine (see README, "Measured at full scale"): installs the carried wheels,
# runs the GPU-marked tests, then the full-size benchmark. Results go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 FORENSIC_VLM_TEST_TOKENIZER=$PWD/.bench/processor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, bitsandbytes, sklearn, pytorch_lightning as pl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'lightning', pl.__version__)"
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 benchmarks/gpu_full_scale.py --out-dir "$OUT" --processor .bench/processor "$@" 2>&1 | grep -v "it/s\]$" | tee "$OUT/benchmark_log.txt" | tail -40
