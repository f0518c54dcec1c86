#!/usr/bin/env bash
# Issue 24's GPU checks as one call on a CUDA machine (H100/H200), from the repository root,
# in order of importance, each phase only while the time budget allows:
#   1. ceiling: gpu_anchor.py `ceil` in its own process, then bench/ceiling_check.py (the
#      same step alone, in short rounds, beside a resident pipeline, beside a busy loader)
#   2. throughput: bench/train_throughput.py eager, every arch, with the profiler on
#      PROFILE_ARCHS (where the 300 px data path loses time)
#   3. pipeline: bench/gpu_pipeline.py, the whole HAM10000-sized job (real metadata's 10,015
#      rows, synthetic 600x450 JPEGs), sequential (then evaluated) and all-at-once, EPOCHS
#      epochs each
#   4. compile: bench/compile_breakeven.py for COMPILE_ARCHS (one process each, compiling at
#      once, measuring one at a time under a lock)
#   5. anchor notebook: gpu_anchor.py `notebook` (the notebook recipe, for the ratio)
# PHASES picks and orders them (default: anchor_ceil ceiling throughput pipeline compile
# anchor_notebook); a phase starts only while enough time is left for it.
# nvidia-smi samples clocks, power and utilization every 250 ms throughout (smi.csv), and
# phases.txt notes when each phase started, so each figure can be matched to its clocks.
#
# Environment: OUT (results; at most 8 files come back from the lent machine, so everything
# is also packed into $OUT/results.tgz after every phase), BUDGET_S (seconds for the whole
# call, default 560), ANCHOR (default ../shared/bench/gpu_anchor.py), WHEELS (wheels to
# install first: pydantic and fairlearn, which the GPU image lacks), EPOCHS (default 2),
# SECS (anchor/ceiling seconds per figure, default 3), METADATA (default
# tests/fixtures/HAM10000_metadata.csv), PROFILE_ARCHS (default efficientnet_b3),
# COMPILE_ARCHS (default efficientnet_b0 efficientnet_b3).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
RES=$(mktemp -d /tmp/skinsense-gpu-XXXX)
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-560} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
# at most $1 seconds, and never past the deadline less $2
cap() { local l=$(( $(left) - $2 )); echo $(( l < $1 ? l : $1 )); }
phase() { echo "$(date +%s.%N) $1" >> "$RES/phases.txt"; echo "== $1 ($(left) s left)"; }
pack() { tar -czf "$OUT/results.tgz.part" -C "$RES" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"; }
ANCHOR=${ANCHOR:-../shared/bench/gpu_anchor.py}
export SECS=${SECS:-3}
if [[ -n "${WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/skinsense-site "$WHEELS"/*.whl || exit 3
    export PYTHONPATH=/tmp/skinsense-site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    python3 -c "import sys, torch, torchvision, lightning, pydantic, fairlearn; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'lightning', lightning.__version__, 'pydantic', pydantic.__version__, 'fairlearn', fairlearn.__version__)"
    echo "cpus $(nproc)"; echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"; date -u +%Y-%m-%dT%H:%M:%SZ
} 2>&1 | tee "$RES/gpu.txt"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu,temperature.gpu,memory.used \
    --format=csv,noheader,nounits -lms 250 > "$RES/smi.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

run_anchor_ceil() {
    phase anchor_ceil
    OUT=$RES timeout $(cap 150 30) python3 "$ANCHOR" ceil 2>&1 | tee "$RES/anchor_ceil.log"
    mv "$RES/anchor.json" "$RES/anchor_ceil.json" 2>/dev/null
}
run_ceiling() {
    phase ceiling_check
    OUT=$RES timeout $(cap 110 20) python3 bench/ceiling_check.py --secs "$SECS" --images 256 \
        2>&1 | tee "$RES/ceiling_check.log"
}
run_throughput() {
    phase throughput
    # shellcheck disable=SC2086
    OUT=$RES timeout $(cap 110 15) python3 bench/train_throughput.py --batch 64 \
        --steps 60 --rounds 3 --profile-archs ${PROFILE_ARCHS:-efficientnet_b3} 2>&1 \
        | tee "$RES/train_throughput.log"
}
run_pipeline() {
    phase pipeline
    OUT=$RES timeout $(( $(left) - 15 )) python3 bench/gpu_pipeline.py \
        --metadata "${METADATA:-tests/fixtures/HAM10000_metadata.csv}" --epochs "${EPOCHS:-2}" \
        --marker "$RES/data-done" > "$RES/gpu_pipeline.log" 2>&1
    tail -40 "$RES/gpu_pipeline.log"
}
run_compile() {
    phase compile
    local pids=() arch
    for arch in ${COMPILE_ARCHS:-efficientnet_b0 efficientnet_b3}; do
        OUT=$RES timeout $(( $(left) - 10 )) python3 bench/compile_breakeven.py --archs "$arch" \
            --lock "$RES/gpu.lock" > "$RES/compile_$arch.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    for f in "$RES"/compile_*.log; do tail -n 3 "$f"; done
}
run_anchor_notebook() {
    phase anchor_notebook
    OUT=$RES timeout $(( $(left) - 10 )) python3 "$ANCHOR" notebook 2>&1 \
        | tee "$RES/anchor_notebook.log"
    mv "$RES/anchor.json" "$RES/anchor_notebook.json" 2>/dev/null
}
# Each phase starts only with at least this many seconds left.
declare -A NEEDS=([anchor_ceil]=120 [ceiling]=90 [throughput]=90 [pipeline]=240 [compile]=150
                  [anchor_notebook]=60)
for part in ${PHASES:-anchor_ceil ceiling throughput pipeline compile anchor_notebook}; do
    if (( $(left) > ${NEEDS[$part]} )); then
        "run_$part"
        pack
    else
        echo "== $part skipped: $(left) s left, it needs ${NEEDS[$part]}"
    fi
done
phase end
kill $SMI 2>/dev/null
python3 - "$RES" <<'EOF' | tee "$RES/clocks_by_phase.txt"
import sys, pandas as pd
res = sys.argv[1]
smi = pd.read_csv(f"{res}/smi.csv", header=None, skipinitialspace=True,
                  names=["t", "sm_mhz", "mem_mhz", "power_w", "util", "temp_c", "mem_mib"])
smi["t"] = (pd.to_datetime(smi["t"], format="%Y/%m/%d %H:%M:%S.%f")
            - pd.Timestamp(0)).dt.total_seconds()
phases = pd.read_csv(f"{res}/phases.txt", sep=" ", header=None, names=["t", "phase"])
# nvidia-smi's timestamps are in local time: shift by the time zone's offset (whole quarter
# hours between its first sample and the first phase, which start a moment apart).
smi["t"] += round((phases["t"].iloc[0] - smi["t"].iloc[0]) / 900) * 900
phases["end"] = phases["t"].shift(-1)
for _, p in phases.dropna().iterrows():
    part = smi[(smi.t >= p.t) & (smi.t < p.end)]
    print(f"{p.phase:16s} {p.end - p.t:6.0f} s  SM MHz median {part.sm_mhz.median():6.0f} "
          f"min {part.sm_mhz.min():6.0f}  power W median {part.power_w.median():6.0f} "
          f"max {part.power_w.max():6.0f}  util median {part.util.median():4.0f}%")
EOF
pack
cp "$RES"/gpu_pipeline.md "$RES"/train_throughput.md "$RES"/clocks_by_phase.txt "$OUT"/ 2>/dev/null
echo "== done ($(left) s left)"
cat "$RES"/gpu_pipeline.md 2>/dev/null; cat "$RES"/train_throughput.md 2>/dev/null
grep -h '"arch"' "$RES"/compile_*.log 2>/dev/null
