#!/usr/bin/env bash
# Merge benchmark: one WARP round over synthetic Gemma 2 checkpoints of increasing size.
#
#   benches/merge.sh                      # 2b shapes with 2, 4, 8 layers, bf16, 3 repeats
#   LAYERS="2 4" REPEAT=5 benches/merge.sh
#   BENCH_DIR=/scratch/bench KEEP=1 benches/merge.sh
#
# For each size it writes, with `gemma-merge synth`, an SFT model and two RL-like runs of two checkpoints
# each (every checkpoint the previous one plus relative noise DRIFT), then times
#   gemma-merge run warp.yaml --out OUT --force -q
# under /usr/bin/time -v (recipe: EMA of each run starting at the SFT, SLERP by layer, LITI η 0.3), and, as
# a baseline, `cat` of every input file to /dev/null (page cache / disk read speed, same session).
# Prints wall time (median of REPEAT), input MB/s, peak RSS (largest of the runs).
#
# Environment: BENCH_DIR (default /tmp/gemma-merge-bench; never inside the repository), SHAPE (2b),
# LAYERS ("2 4 8"), DTYPE (bfloat16), DRIFT (0.01), REPEAT (3), THREADS (default: all cores),
# KEEP=1 keeps the generated models (default: each size is deleted once measured).
# Disk: 6 models at once (5 inputs + the output); 2b bf16 is 1.18 GB + 0.156 GB per layer each,
# so 8 layers need about 15 GB.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/gemma-merge-bench}
SHAPE=${SHAPE:-2b}
LAYERS=${LAYERS:-"2 4 8"}
DTYPE=${DTYPE:-bfloat16}
DRIFT=${DRIFT:-0.01}
REPEAT=${REPEAT:-3}
KEEP=${KEEP:-0}
THREAD_ARGS=()
if [[ -n "${THREADS:-}" ]]; then THREAD_ARGS=(--threads "$THREADS"); fi

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd -P)
case "$BENCH_DIR/" in
  "$(cd "$ROOT" && pwd -P)"/*) echo "error: BENCH_DIR must be outside the repository" >&2; exit 2 ;;
esac
[[ -x /usr/bin/time ]] || { echo "error: /usr/bin/time (GNU time) is required" >&2; exit 2; }

echo "building (release)..." >&2
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin gemma-merge
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/gemma-merge
GM=("$BIN" "${THREAD_ARGS[@]}")

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
maximum() { sort -g | tail -n 1; }
now() { date +%s.%N; }
# Seconds and peak RSS (KiB) from a /usr/bin/time -v log.
wall_of() { awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; print s }' "$1"; }
rss_of() { awk -F': ' '/Maximum resident set size/ { print $2 }' "$1"; }

write_recipe() {
  cat > "$1" <<'YAML'
# One WARP round: two RL runs (EMA of two checkpoints each, starting at the SFT), SLERP, LITI.
output: out
dtype: bfloat16
base: sft
models:
  sft: sft
steps:
  - name: run_a
    method: ema
    models: [run_a/step-100, run_a/step-200]
    decay: 0.01
    steps: [100, 200]
    start: sft
  - name: run_b
    method: ema
    models: [run_b/step-100, run_b/step-200]
    decay: 0.01
    steps: [100, 200]
    start: sft
  - name: slerp
    method: slerp
    models: [run_a, run_b]
    t: 0.5
    angle: layer
  - name: warp
    method: liti
    model: slerp
    eta: 0.3
YAML
}

ROWS=()
for n in $LAYERS; do
  d="$BENCH_DIR/$SHAPE-L$n"
  rm -rf "$d"
  mkdir -p "$d/run_a" "$d/run_b"
  echo "== $SHAPE, $n layers: writing 5 checkpoints into $d" >&2
  "${GM[@]}" -q synth --shape "$SHAPE" --layers "$n" --dtype "$DTYPE" --seed 0 --out "$d/sft"
  "${GM[@]}" -q synth --from "$d/sft" --drift "$DRIFT" --seed 1 --out "$d/run_a/step-100"
  "${GM[@]}" -q synth --from "$d/run_a/step-100" --drift "$DRIFT" --seed 2 --out "$d/run_a/step-200"
  "${GM[@]}" -q synth --from "$d/sft" --drift "$DRIFT" --seed 3 --out "$d/run_b/step-100"
  "${GM[@]}" -q synth --from "$d/run_b/step-100" --drift "$DRIFT" --seed 4 --out "$d/run_b/step-200"
  write_recipe "$d/warp.yaml"
  mapfile -t inputs < <(find "$d/sft" "$d/run_a" "$d/run_b" -name '*.safetensors' | sort)
  model_bytes=$(stat -c %s "$d"/sft/*.safetensors | awk '{ s += $1 } END { print s }')
  input_bytes=$(stat -c %s "${inputs[@]}" | awk '{ s += $1 } END { print s }')

  cat_times=()
  walls=()
  rsses=()
  for r in $(seq "$REPEAT"); do
    t0=$(now); cat "${inputs[@]}" > /dev/null; t1=$(now)
    cat_times+=("$(echo "$t1 - $t0" | bc -l)")
    log="$d/time-$r.log"
    /usr/bin/time -v -o "$log" "${GM[@]}" run "$d/warp.yaml" --out "$d/out" --force -q
    walls+=("$(wall_of "$log")")
    rsses+=("$(rss_of "$log")")
    echo "   run $r: cat ${cat_times[-1]} s, merge ${walls[-1]} s, peak RSS $(( ${rsses[-1]} / 1024 )) MiB" >&2
  done
  wall=$(printf '%s\n' "${walls[@]}" | median)
  cat_s=$(printf '%s\n' "${cat_times[@]}" | median)
  rss_kb=$(printf '%s\n' "${rsses[@]}" | maximum)
  ROWS+=("$(awk -v n="$n" -v mb="$model_bytes" -v ib="$input_bytes" -v w="$wall" -v c="$cat_s" -v r="$rss_kb" -v s="$SHAPE" \
    'BEGIN { printf "%-10s %10.2f %12.2f %10.2f %9.0f %10.2f %9.0f %12.0f", s "-L" n, mb / 1e9, ib / 1e9, w, ib / 1e6 / w, c, ib / 1e6 / c, r / 1024 }')")
  if [[ "$KEEP" != 1 ]]; then rm -rf "$d"; fi
done

printf '\n%-10s %10s %12s %10s %9s %10s %9s %12s\n' model "model GB" "inputs GB" "wall s" "MB/s" "cat s" "cat MB/s" "peak RSS MiB"
printf '%s\n' "${ROWS[@]}"
echo "(wall: median of $REPEAT runs of 'gemma-merge run'; MB/s: input bytes / wall; peak RSS: largest of the runs; cat: median of $REPEAT)"
