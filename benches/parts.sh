#!/usr/bin/env bash
# Split-run benchmark: one WARP round run plainly, then as N parts (one after another, and two at a
# time) followed by the join; every joined output is checked byte for byte against the plain run.
#
#   benches/parts.sh                          # 2b shapes, 4 layers, vocabulary 32000, N = 2 and 4
#   PARTS="2 3 4" LAYERS=8 benches/parts.sh
#   GM=/path/to/gemma-merge BENCH_DIR=/scratch/parts KEEP=1 benches/parts.sh
#
# Inputs (gemma-merge synth): an SFT model and two RL-like runs (SFT plus relative noise DRIFT). Recipe:
# SLERP of the two runs' task vectors by layer, then LITI η 0.3, bf16, shards of SHARD bytes (the
# default 100 MB gives 9 shards of the 0.77 GB model). Prints, per N and mode: the bytes each part wrote,
# the wall time of each part, the sum and the longest, the join's wall time, and the whole run's.
#
# Environment: GM (a gemma-merge binary; default: build the release one), BENCH_DIR (default
# /tmp/gemma-merge-parts-bench; never inside the repository), SHAPE (2b), LAYERS (4), VOCAB (32000),
# SHARD (100000000), PARTS ("2 4"), DRIFT (0.01), THREADS (default: all cores), KEEP=1 keeps the models.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/gemma-merge-parts-bench}
SHAPE=${SHAPE:-2b}
LAYERS=${LAYERS:-4}
VOCAB=${VOCAB:-32000}
SHARD=${SHARD:-100000000}
PARTS=${PARTS:-"2 4"}
DRIFT=${DRIFT:-0.01}
KEEP=${KEEP:-0}
THREAD_ARGS=()
if [[ -n "${THREADS:-}" ]]; then THREAD_ARGS=(--threads "$THREADS"); fi

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd -P)
case "$BENCH_DIR/" in
  "$(cd "$ROOT" && pwd -P)"/*) echo "error: BENCH_DIR must be outside the repository" >&2; exit 2 ;;
esac
if [[ -z "${GM:-}" ]]; then
  echo "building (release)..." >&2
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin gemma-merge
  GM=${CARGO_TARGET_DIR:-$ROOT/target}/release/gemma-merge
fi
G=("$GM" "${THREAD_ARGS[@]}" -q)
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

cd "$BENCH_DIR"
rm -rf out plain
for m in sft run_a run_b; do
  if [[ ! -d $m ]]; then
    case $m in
      sft) "${G[@]}" synth --shape "$SHAPE" --layers "$LAYERS" --vocab-size "$VOCAB" --seed 1 --out sft ;;
      run_a) "${G[@]}" synth --from sft --drift "$DRIFT" --seed 2 --out run_a ;;
      run_b) "${G[@]}" synth --from sft --drift "$DRIFT" --seed 3 --out run_b ;;
    esac
  fi
done
cat > warp.yaml <<YAML
output: out/warp
dtype: bfloat16
base: sft
shard_size: $SHARD
steps:
  - name: slerp
    method: slerp
    models: [run_a, run_b]
    t: 0.5
  - name: warp
    method: liti
    model: slerp
    eta: 0.3
YAML
input_bytes=$(du -cb sft/*.safetensors run_a/*.safetensors run_b/*.safetensors | tail -n 1 | cut -f1)
echo "inputs: 3 models, $input_bytes bytes; machine: $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"

t0=$(now)
"${G[@]}" run warp.yaml --out plain/warp
t1=$(now)
out_bytes=$(du -cb plain/warp/* | tail -n 1 | cut -f1)
echo "plain run: $(secs "$t0" "$t1") s, $out_bytes bytes written"

# Compares out/warp with plain/warp: every file, the manifests without their "seconds" line.
same() {
  local f name
  for f in plain/warp/*; do
    name=$(basename "$f")
    if [[ $name == merge-manifest.json ]]; then
      cmp -s <(grep -v '"seconds"' "$f") <(grep -v '"seconds"' "out/warp/$name") || return 1
    else
      cmp -s "$f" "out/warp/$name" || return 1
    fi
  done
}

part_bytes() { # bytes written by part $1 of $2 (from its manifest)
  python3 -c 'import json,sys; print(sum(f["size"] for f in json.load(open(sys.argv[1]))["files"]))' \
    "$(printf 'out/.warp.gemma-merge-parts/part-%05d-of-%05d.json' "$1" "$2")"
}

printf '%-3s %-10s %-44s %-28s %7s %7s %6s %7s %s\n' N mode "MB per part" "wall per part (s)" sum max join total same
for n in $PARTS; do
  for mode in sequential pairs; do
    rm -rf out
    declare -a walls=()
    start=$(now)
    i=1
    while (( i <= n )); do
      if [[ $mode == pairs && $((i + 1)) -le $n ]]; then
        a=$(now)
        "${G[@]}" run warp.yaml --part "$i/$n" & p1=$!
        "${G[@]}" run warp.yaml --part "$((i + 1))/$n" & p2=$!
        wait "$p1"; b1=$(now)
        wait "$p2"; b2=$(now)
        walls+=("$(secs "$a" "$b1")" "$(secs "$a" "$b2")")
        i=$((i + 2))
      else
        a=$(now)
        "${G[@]}" run warp.yaml --part "$i/$n"
        walls+=("$(secs "$a" "$(now)")")
        i=$((i + 1))
      fi
    done
    bytes=()
    for ((k = 1; k <= n; k++)); do bytes+=("$(part_bytes "$k" "$n" | awk '{ printf "%.1f", $1 / 1e6 }')"); done
    j0=$(now)
    "${G[@]}" join warp.yaml
    j1=$(now)
    ok=no; same && ok=yes
    sum=$(printf '%s\n' "${walls[@]}" | awk '{ s += $1 } END { printf "%.2f", s }')
    max=$(printf '%s\n' "${walls[@]}" | sort -g | tail -n 1)
    printf '%-3s %-10s %-44s %-28s %7s %7s %6s %7s %s\n' "$n" "$mode" "${bytes[*]}" "${walls[*]}" \
      "$sum" "$max" "$(secs "$j0" "$j1")" "$(secs "$start" "$j1")" "$ok"
    unset walls
  done
done
rm -rf out plain
if [[ $KEEP != 1 ]]; then rm -rf sft run_a run_b warp.yaml; fi
