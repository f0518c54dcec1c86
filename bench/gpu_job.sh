#!/usr/bin/env bash
# The GPU checks of the training engine, as one job on a CUDA machine (H100/H200), from the
# repository root. Everything lands in $OUT (default: ./gpu-results):
#   gpu.txt            GPU, driver, library versions
#   anchor.log/.json   ../shared/bench/gpu_anchor.py ceil notebook (the reference figures)
#   pytest_gpu.log     tests/test_training_gpu.py (the `gpu`-marked tests)
#   train_throughput.* bench/train_throughput.py: eager for every arch, then compiled
#
# Environment:
#   ANCHOR          path of gpu_anchor.py (default ../shared/bench/gpu_anchor.py)
#   WHEELS          folder of wheels to install first (the GPU image lacks pydantic)
#   PARTS           what to run, any of: anchor tests bench (default: all three)
#   STEPS           measured steps per figure, over ROUNDS alternations (default 100, 5)
#   ARCHS           architectures to measure (default: the bench's three)
#   COMPILE_ARCHS   architectures to measure compiled (default: the two EfficientNets;
#                   set but empty: eager only)
#   BENCH_TIMEOUT   seconds for the throughput bench, compile included (default 300);
#                   results are rewritten after every step, so a cut-off run keeps them
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
ANCHOR=${ANCHOR:-../shared/bench/gpu_anchor.py}
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/skinsense-site "$WHEELS"/*.whl || exit 3
    export PYTHONPATH=/tmp/skinsense-site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, torchvision, lightning, pydantic; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__, 'pydantic', pydantic.__version__)"
    nproc
    date -u +%Y-%m-%dT%H:%M:%SZ
} 2>&1 | tee "$OUT/gpu.txt"

PARTS=" ${PARTS:-anchor tests bench} "
if [[ $PARTS == *" anchor "* ]]; then
    echo "== anchor: ceil notebook"
    SECS=${SECS:-8} python3 "$ANCHOR" ceil notebook 2>&1 | tee "$OUT/anchor.log"
fi
if [[ $PARTS == *" tests "* ]]; then
    echo "== gpu tests"
    timeout 180 python3 -m pytest -m gpu tests/test_training_gpu.py -q -p no:cacheprovider \
        2>&1 | tee "$OUT/pytest_gpu.log"
fi
if [[ $PARTS == *" bench "* ]]; then
    echo "== training throughput"
    COMPILE_ARCHS=${COMPILE_ARCHS-efficientnet_b0 efficientnet_b3}
    # shellcheck disable=SC2086
    timeout "${BENCH_TIMEOUT:-300}" python3 bench/train_throughput.py --batch 64 \
        --steps "${STEPS:-100}" --rounds "${ROUNDS:-5}" ${ARCHS:+--archs $ARCHS} \
        ${COMPILE_ARCHS:+--compile --compile-archs $COMPILE_ARCHS} 2>&1 \
        | tee "$OUT/train_throughput.log"
fi
echo "== done"
tail -8 "$OUT/anchor.log" 2>/dev/null
cat "$OUT/train_throughput.md" 2>/dev/null
