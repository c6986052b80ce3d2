#!/usr/bin/env bash
# One GPU session's measurements for BENCHMARKS.md (nvidia-h200 through the device tool): the peer and ours in
# the same run, on random-weight models of the real architectures. Needs .whl/ (diffusers, bitsandbytes) and
# .bench/reference (a copy of ../shared/reference) carried with the call.
#   bash benchmarks/gpu_session.sh sdxl|sd15 STEPS OUT_DIR
set -euo pipefail
arch=$1 steps=$2 out=$3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case $arch in
  sdxl) ours=${OURS:-low_memory,low_memory_draws,fast_checkpointing} peer=checkpointing e2e=() ;;
  sd15) ours=${OURS:-low_memory,fast} peer=default e2e=(--e2e-steps "${E2E:-500}") ;;  # E2E=0: none
esac
python3 benchmarks/bench.py --arch "$arch" --steps "$steps" --ours "$ours" --peer "$peer" "${e2e[@]}" \
    --peer-dir .bench/reference --work /tmp/bench --out "$out/bench-$arch.json" --rows-to "$out/rows-$arch.md" \
    2>&1 | tee "$out/log-$arch.txt"
