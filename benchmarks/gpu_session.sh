#!/usr/bin/env bash
# One GPU session's measurements for BENCHMARKS.md (nvidia-h200 through the device tool): the peer and ours in
# the same run, on random-weight models of the real architectures. Needs .whl/ (diffusers, bitsandbytes) and
# .bench/reference (a copy of ../shared/reference) carried with the call.
#   bash benchmarks/gpu_session.sh sdxl|sd15 STEPS OUT_DIR
# OURS=variants (bench.py's), E2E=steps of the end-to-end job (0: none), PEER_E2E=1 times the peer on it too,
# PROBES=names of probe_memory.py's probes to run first on the same model (e.g. PROBES=recordings),
# PEER=the peer's step variants (empty: none), E2E_VARIANT=the variant of ours the end-to-end job runs with.
set -euo pipefail
arch=$1 steps=$2 out=$3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# Bytecode as a user's `pip install` leaves it: the device sets PYTHONDONTWRITEBYTECODE, so without this every
# process compiled diffusers and finetune from source again (BENCHMARKS.md, sixth session: the start-up).
python3 -m compileall -q -j 0 /tmp/site finetune benchmarks recipes >/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case $arch in
  sdxl) ours=${OURS:-low_memory,low_memory_draws,fast_checkpointing} peer=${PEER-checkpointing} e2e=() ;;
  sd15) ours=${OURS:-low_memory,fast} peer=${PEER-default}
        e2e=(--e2e-steps "${E2E:-500}" --e2e-variant "${E2E_VARIANT:-fast}") ;;
esac
if [ -n "${PROBES:-}" ]; then
  python3 -c "from benchmarks.models import build_sd15, build_sdxl; {'sd15': build_sd15, 'sdxl': build_sdxl}['$arch']('/tmp/bench/model-$arch')"
  for probe in ${PROBES//,/ }; do
    python3 benchmarks/probe_memory.py "$probe" --model "/tmp/bench/model-$arch" --work /tmp/probe \
        --out "$out/probe-$probe.json" 2>&1 | grep '^[{[]' | tee -a "$out/log-probes.txt" || echo "probe $probe failed"
  done
fi
if [ "${PEER_E2E:-0}" = 1 ] && [ "$arch" = sd15 ] && [ "${E2E:-500}" != 0 ]; then e2e+=(--peer-e2e); fi
python3 benchmarks/bench.py --arch "$arch" --steps "$steps" --ours "$ours" --peer "$peer" "${e2e[@]}" \
    --peer-dir .bench/reference --work /tmp/bench --out "$out/bench-$arch.json" --rows-to "$out/rows-$arch.md" \
    2>&1 | tee "$out/log-$arch.txt"
