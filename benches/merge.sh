#!/usr/bin/env bash
# Merge benchmark: one WARP round over synthetic Gemma 2 checkpoints of increasing size.
#
#   benches/merge.sh                      # 2b shapes with 2, 4, 8 layers, bf16, 3 repeats
#   LAYERS="2 4" REPEAT=5 benches/merge.sh
#   BENCH_DIR=/scratch/bench KEEP=1 benches/merge.sh
#
# For each size it writes, with `gemma-merge synth`, an SFT model and two RL-like runs of two checkpoints
# each (every checkpoint the previous one plus relative noise DRIFT), then times, for each recipe of
# RECIPES (default "warp ties"),
#   gemma-merge run RECIPE.yaml --out OUT --force -q   (OUT removed first, untimed)
# under /usr/bin/time -v (warp: EMA of each run starting at the SFT, SLERP by layer, LITI η 0.3; ties: TIES
# of the four RL checkpoints on the SFT, density 0.5, which takes a selection pass per tensor), and, as
# a baseline, `cat` of every input file to /dev/null (page cache / disk read speed, same session).
# Prints wall time (median of REPEAT), input MB/s, peak RSS (largest of the runs).
#
# Floors, measured in the same run: "memory floor" = reading every input once from the page cache (`cat`)
# plus writing the output's bytes to OUT_DIR; "durable floor" (when OUT_DIR is on a disk) adds fsync.
# The output goes to OUT_DIR (default /dev/shm when it exists: tmpfs, so the merge is compared with the
# in-memory floor; set OUT_DIR to a disk folder for the durable comparison).
#
# Side by side (optional, never in CI): with MERGEKIT (the `mergekit-yaml` executable of a throwaway venv),
# each round also runs a linear merge of the five checkpoints with gemma-merge and with mergekit
# (`mergekit-yaml --lazy-unpickle`, same weights, bf16 out, same OUT_DIR), alternating, and prints the ratio.
#
# Environment: BENCH_DIR (default /tmp/gemma-merge-bench; never inside the repository), SHAPE (2b),
# LAYERS ("2 4 8"), DTYPE (bfloat16), DRIFT (0.01), REPEAT (3), THREADS (default: all cores),
# KEEP=1 keeps the generated models and reuses them next time (default: each size is deleted once measured),
# OUT_DIR, MERGEKIT, RECIPES.
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
MERGEKIT=${MERGEKIT:-}
RECIPES=${RECIPES:-warp ties}
if [[ -z "${OUT_DIR:-}" ]]; then OUT_DIR=$([[ -d /dev/shm ]] && echo /dev/shm/gemma-merge-bench || echo "$BENCH_DIR/out"); fi
mkdir -p "$OUT_DIR"
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

# The start of every recipe below: bf16 output, the SFT as base.
recipe_head() {
  printf '# %s\noutput: out\ndtype: bfloat16\nbase: sft\nmodels:\n  sft: sft\nsteps:\n' "$2" > "$1"
}

write_recipe() {
  recipe_head "$1" "One WARP round: two RL runs (EMA of two checkpoints each, starting at the SFT), SLERP, LITI."
  cat >> "$1" <<'YAML'
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

write_ties() {
  recipe_head "$1" "TIES of the four RL checkpoints on the SFT (mergekit's ties: top 50% of each task vector, sign election)."
  cat >> "$1" <<'YAML'
  - name: ties
    method: ties
    models: [run_a/step-100, run_a/step-200, run_b/step-100, run_b/step-200]
    weights: [0.25, 0.25, 0.25, 0.25]
    density: 0.5
YAML
}

write_linear() {
  cat > "$1" <<YAML
# A linear merge of the five checkpoints (the same one mergekit runs below).
output: out
dtype: bfloat16
base: $2/sft
steps:
  - name: avg
    method: linear
    models: [$2/sft, $2/run_a/step-100, $2/run_a/step-200, $2/run_b/step-100, $2/run_b/step-200]
    weights: [0.2, 0.2, 0.2, 0.2, 0.2]
YAML
  cat > "$1.mergekit.yaml" <<YAML
merge_method: linear
dtype: bfloat16
models:
  - {model: $2/sft, parameters: {weight: 0.2}}
  - {model: $2/run_a/step-100, parameters: {weight: 0.2}}
  - {model: $2/run_a/step-200, parameters: {weight: 0.2}}
  - {model: $2/run_b/step-100, parameters: {weight: 0.2}}
  - {model: $2/run_b/step-200, parameters: {weight: 0.2}}
YAML
}

ROWS=()
FLOOR_ROWS=()
MK_ROWS=()
for n in $LAYERS; do
  d="$BENCH_DIR/$SHAPE-L$n"
  if [[ "$KEEP" == 1 && -f "$d/run_b/step-200/config.json" ]]; then
    echo "== $SHAPE, $n layers: reusing the checkpoints in $d (KEEP=1)" >&2
  else
    rm -rf "$d"
    mkdir -p "$d/run_a" "$d/run_b"
    echo "== $SHAPE, $n layers: writing 5 checkpoints into $d" >&2
    "${GM[@]}" -q synth --shape "$SHAPE" --layers "$n" --dtype "$DTYPE" --seed 0 --out "$d/sft"
    "${GM[@]}" -q synth --from "$d/sft" --drift "$DRIFT" --seed 1 --out "$d/run_a/step-100"
    "${GM[@]}" -q synth --from "$d/run_a/step-100" --drift "$DRIFT" --seed 2 --out "$d/run_a/step-200"
    "${GM[@]}" -q synth --from "$d/sft" --drift "$DRIFT" --seed 3 --out "$d/run_b/step-100"
    "${GM[@]}" -q synth --from "$d/run_b/step-100" --drift "$DRIFT" --seed 4 --out "$d/run_b/step-200"
  fi
  write_recipe "$d/warp.yaml"
  write_ties "$d/ties.yaml"
  mapfile -t inputs < <(find "$d/sft" "$d/run_a" "$d/run_b" -name '*.safetensors' | sort)
  model_bytes=$(stat -c %s "$d"/sft/*.safetensors | awk '{ s += $1 } END { print s }')
  input_bytes=$(stat -c %s "${inputs[@]}" | awk '{ s += $1 } END { print s }')

  write_linear "$d/linear.yaml" "$d"
  out="$OUT_DIR/$SHAPE-L$n"
  cat_times=()
  floors=()
  durables=()
  declare -A walls=() rsses=()
  lin=(); mk=()
  cat "${inputs[@]}" > /dev/null
  # With the inputs cached, the outputs (the merge's and the floor's file: on tmpfs, in memory) need free
  # memory. Taking it from other files' cached pages makes every run reclaim them: a TIES merge measured
  # 7.7 s with 6 s of system time instead of 5.4 s and 2 s, and the floors move with it.
  free_bytes=$(( $(awk '/^MemFree:/ { print $2 }' /proc/meminfo 2> /dev/null || echo 0) * 1024 ))
  if (( free_bytes > 0 && free_bytes < 2 * model_bytes + (1 << 30) )); then
    echo "warning: $(( free_bytes >> 20 )) MiB of memory free beside the cached inputs, for 2 × $(( model_bytes >> 20 ))" \
      "MiB of outputs and 1 GiB to spare: drop other large files from the page cache (and empty" \
      "$OUT_DIR's file system) first, or the times will include memory reclaim" >&2
  fi
  for r in $(seq "$REPEAT"); do
    t0=$(now); cat "${inputs[@]}" > /dev/null; t1=$(now)
    cat_times+=("$(echo "$t1 - $t0" | bc -l)")
    # The output's bytes written once to OUT_DIR (and, for the durable floor, synced).
    # dd in 16 MiB blocks: the cheapest way to write the bytes (head -c's small writes took 0.2 s more).
    t2=$(now); dd if=/dev/zero of="$OUT_DIR/floor.bin" bs=16M count="$model_bytes" iflag=count_bytes status=none; t3=$(now)
    dd if=/dev/zero of="$OUT_DIR/floor.bin" bs=16M count="$model_bytes" iflag=count_bytes conv=fsync status=none; t4=$(now)
    rm -f "$OUT_DIR/floor.bin"
    floors+=("$(echo "$t1 - $t0 + $t3 - $t2" | bc -l)")
    durables+=("$(echo "$t1 - $t0 + $t4 - $t3" | bc -l)")
    echo "   run $r: cat ${cat_times[-1]} s, memory floor ${floors[-1]} s, durable floor ${durables[-1]} s" >&2
    for rec in $RECIPES; do
      log="$d/time-$rec-$r.log"
      # Into a fresh folder, as the floors write a fresh file: replacing the previous output would also
      # time freeing it (on tmpfs, reclaiming memory for both copies at once).
      rm -rf "$out"
      /usr/bin/time -v -o "$log" "${GM[@]}" run "$d/$rec.yaml" --out "$out" --force -q
      walls[$rec]+="$(wall_of "$log") "
      rsses[$rec]+="$(rss_of "$log") "
      echo "   run $r: $rec $(wall_of "$log") s, peak RSS $(( $(rss_of "$log") / 1024 )) MiB" >&2
    done
    if [[ -n "$MERGEKIT" ]]; then
      t0=$(now); "${GM[@]}" run "$d/linear.yaml" --out "$out-linear" --force -q; t1=$(now)
      rm -rf "$out-mergekit"
      "$MERGEKIT" "$d/linear.yaml.mergekit.yaml" "$out-mergekit" --lazy-unpickle --no-copy-tokenizer > /dev/null 2>&1 || true
      t2=$(now)
      [[ -f "$out-mergekit/config.json" ]] || { echo "error: mergekit failed (see $d)" >&2; exit 1; }
      lin+=("$(echo "$t1 - $t0" | bc -l)"); mk+=("$(echo "$t2 - $t1" | bc -l)")
      echo "   run $r: linear merge of 5: gemma-merge ${lin[-1]} s, mergekit ${mk[-1]} s" >&2
    fi
  done
  rm -rf "$out" "$out-linear" "$out-mergekit"
  floor=$(printf '%s\n' "${floors[@]}" | median)
  durable=$(printf '%s\n' "${durables[@]}" | median)
  cat_s=$(printf '%s\n' "${cat_times[@]}" | median)
  for rec in $RECIPES; do
    wall=$(printf '%s\n' ${walls[$rec]} | median)
    rss_kb=$(printf '%s\n' ${rsses[$rec]} | maximum)
    FLOOR_ROWS+=("$(awk -v m="$SHAPE-L$n" -v rec="$rec" -v w="$wall" -v f="$floor" -v d="$durable" \
      'BEGIN { printf "%-10s %-6s %10.2f %14.2f %9.2f %15.2f %9.2f", m, rec, w, f, w / f, d, w / d }')")
    ROWS+=("$(awk -v n="$n" -v rec="$rec" -v mb="$model_bytes" -v ib="$input_bytes" -v w="$wall" -v c="$cat_s" -v r="$rss_kb" -v s="$SHAPE" \
      'BEGIN { printf "%-10s %-6s %10.2f %12.2f %10.2f %9.0f %10.2f %9.0f %12.0f", s "-L" n, rec, mb / 1e9, ib / 1e9, w, ib / 1e6 / w, c, ib / 1e6 / c, r / 1024 }')")
  done
  if [[ -n "$MERGEKIT" ]]; then
    l=$(printf '%s\n' "${lin[@]}" | median); k=$(printf '%s\n' "${mk[@]}" | median)
    MK_ROWS+=("$(awk -v m="$SHAPE-L$n" -v l="$l" -v k="$k" 'BEGIN { printf "%-10s %14.2f %10.2f %8.2f", m, l, k, k / l }')")
  fi
  if [[ "$KEEP" != 1 ]]; then rm -rf "$d"; fi
done

printf '\n%-10s %-6s %10s %12s %10s %9s %10s %9s %12s\n' model recipe "model GB" "inputs GB" "wall s" "MB/s" "cat s" "cat MB/s" "peak RSS MiB"
printf '%s\n' "${ROWS[@]}"
echo "(wall: median of $REPEAT runs of 'gemma-merge run'; MB/s: input bytes / wall; peak RSS: largest of the runs; cat: median of $REPEAT)"
printf '\n%-10s %-6s %10s %14s %9s %15s %9s\n' model recipe "merge s" "memory floor s" "ratio" "durable floor s" "ratio"
printf '%s\n' "${FLOOR_ROWS[@]}"
echo "(output in $OUT_DIR; memory floor: cat of the inputs + writing the output's bytes there; durable: + fsync)"
if [[ ${#MK_ROWS[@]} -gt 0 ]]; then
  printf '\n%-10s %14s %10s %8s\n' model "gemma-merge s" "mergekit s" "ratio"
  printf '%s\n' "${MK_ROWS[@]}"
  echo "(linear merge of the 5 checkpoints, bf16 out, medians of $REPEAT alternating runs; ratio: mergekit / gemma-merge)"
fi
