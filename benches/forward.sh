#!/usr/bin/env bash
# Forward-pass benchmark: prefill and decode speed and peak RSS of the built-in Gemma 2, on synthetic
# checkpoints with real gemma-2-2b shapes (random weights, vocabulary 256 000) and fewer layers.
#
#   benches/forward.sh                          # 2b shapes, 4 layers, bf16
#   LAYERS="2 4 8" benches/forward.sh
#   LAYERS=26 PREFILL=64 DECODE=8 benches/forward.sh   # the whole 2b (5.2 GB bf16)
#
# For each size it writes the model with `gemma-merge synth` into BENCH_DIR (reused if there), then:
#   prefill: gemma-merge eval MODEL --token-ids (PREFILL random ids after <bos>) --json      → tokens/s
#   decode:  gemma-merge generate MODEL --token-ids (PROMPT ids) --max-new-tokens DECODE --json
#            → decode_tokens_per_second (one-token forward passes with the KV cache)
# each under /usr/bin/time -v (peak RSS), after one untimed pass that brings the file into the page cache.
# Decoding one token reads every weight once (the tied embedding is the output projection), so
# "decode GB/s" = weight bytes × decode tokens/s; it is set beside a read-bandwidth baseline (the weights
# file summed from the page cache by numpy with THREADS threads, when python3 + numpy are there).
# "prefill GFLOP/s" counts 2 FLOPs per weight per token (matrix products only; attention is extra).
#
# Environment: BENCH_DIR (default /tmp/gemma-merge-bench; never inside the repository), SHAPE (2b),
# LAYERS ("4"), DTYPE (bfloat16), PREFILL (128), PROMPT (16), DECODE (32), REPEAT (3; medians),
# THREADS (default: all cores), KEEP=1 keeps the models for the next run (default: each is deleted once measured).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/tmp/gemma-merge-bench}
SHAPE=${SHAPE:-2b}
LAYERS=${LAYERS:-4}
DTYPE=${DTYPE:-bfloat16}
PREFILL=${PREFILL:-128}
PROMPT=${PROMPT:-16}
DECODE=${DECODE:-32}
REPEAT=${REPEAT:-3}
KEEP=${KEEP:-0}
THREADS=${THREADS:-$(nproc)}

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd -P)
case "$BENCH_DIR/" in
  "$(cd "$ROOT" && pwd -P)"/*) echo "error: BENCH_DIR must be outside the repository" >&2; exit 2 ;;
esac
[[ -x /usr/bin/time ]] || { echo "error: /usr/bin/time (GNU time) is required" >&2; exit 2; }

echo "building (release)..." >&2
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin gemma-merge
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/gemma-merge
GM=("$BIN" --threads "$THREADS")

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
maximum() { sort -g | tail -n 1; }
rss_of() { awk -F': ' '/Maximum resident set size/ { print $2 }' "$1"; }
json_num() { grep -o "\"$1\":[-0-9.e+]*" "$2" | head -n 1 | cut -d: -f2; }
# N token ids in 3..255999 after <bos>, the same for a given seed.
random_ids() { awk -v n="$1" -v seed="$2" 'BEGIN { srand(seed); s = "2"; for (i = 1; i < n; i++) s = s "," int(3 + rand() * 255997); print s }'; }

bandwidth() {
  python3 - "$@" <<'PY' 2>/dev/null || echo "n/a"
import sys, time, threading
import numpy as np
threads = int(sys.argv[1])
arrays = [np.memmap(p, dtype=np.uint8, mode="r") for p in sys.argv[2:]]
words = [a[: a.size // 8 * 8].view(np.uint64) for a in arrays]
total = sum(a.size for a in arrays)
def run():
    parts = [w[i * w.size // threads:(i + 1) * w.size // threads] for w in words for i in range(threads)]
    chunks = [parts[i::threads] for i in range(threads)]
    ts = [threading.Thread(target=lambda c=c: [p.sum() for p in c]) for c in chunks]
    t = time.perf_counter(); [x.start() for x in ts]; [x.join() for x in ts]
    return time.perf_counter() - t
run()
print("%.1f" % (total / min(run() for _ in range(3)) / 1e9))
PY
}

ROWS=()
for n in $LAYERS; do
  d="$BENCH_DIR/$SHAPE-L$n-$DTYPE"
  if [[ ! -f "$d/config.json" ]]; then
    rm -rf "$d"
    echo "== writing $SHAPE with $n layers ($DTYPE) into $d" >&2
    "${GM[@]}" -q synth --shape "$SHAPE" --layers "$n" --dtype "$DTYPE" --seed 0 --out "$d"
  fi
  mapfile -t files < <(find "$d" -name '*.safetensors' | sort)
  bytes=$(stat -c %s "${files[@]}" | awk '{ s += $1 } END { print s }')
  elem=$([[ "$DTYPE" == float32 ]] && echo 4 || echo 2)
  prefill_ids=$(random_ids "$PREFILL" 1)
  prompt_ids=$(random_ids "$PROMPT" 2)
  # Warm the page cache (and check that both commands run).
  "${GM[@]}" -q eval "$d" --token-ids "$(random_ids 4 3)" --json > /dev/null
  pre=(); dec=(); rss_e=(); rss_g=()
  for r in $(seq "$REPEAT"); do
    /usr/bin/time -v -o "$d/eval.time" "${GM[@]}" -q eval "$d" --token-ids "$prefill_ids" --json > "$d/eval.json"
    /usr/bin/time -v -o "$d/gen.time" "${GM[@]}" -q generate "$d" --token-ids "$prompt_ids" \
      --max-new-tokens "$DECODE" --json > "$d/gen.json"
    pre+=("$(json_num tokens_per_second "$d/eval.json")")
    dec+=("$(json_num decode_tokens_per_second "$d/gen.json")")
    rss_e+=("$(rss_of "$d/eval.time")"); rss_g+=("$(rss_of "$d/gen.time")")
    echo "   run $r: prefill ${pre[-1]} tokens/s, decode ${dec[-1]} tokens/s, peak RSS" \
      "$(( ${rss_e[-1]} / 1024 )) / $(( ${rss_g[-1]} / 1024 )) MiB" >&2
  done
  p=$(printf '%s\n' "${pre[@]}" | median)
  g=$(printf '%s\n' "${dec[@]}" | median)
  re=$(printf '%s\n' "${rss_e[@]}" | maximum)
  rg=$(printf '%s\n' "${rss_g[@]}" | maximum)
  bw=$(bandwidth "$THREADS" "${files[@]}")
  ROWS+=("$(awk -v m="$SHAPE-L$n" -v b="$bytes" -v e="$elem" -v p="$p" -v g="$g" -v re="$re" -v rg="$rg" -v bw="$bw" \
    'BEGIN { printf "%-10s %9.2f %11.1f %9.1f %10.2f %10.1f %10s %9.0f %9.0f", m, b / 1e9, p, 2 * b / e * p / 1e9, g, b * g / 1e9, bw, re / 1024, rg / 1024 }')")
  if [[ "$KEEP" != 1 ]]; then rm -rf "$d"; fi
done

printf '\n%-10s %9s %11s %9s %10s %10s %10s %9s %9s\n' model "GB" "prefill t/s" "GFLOP/s" "decode t/s" "decode GB/s" "read GB/s" "RSS eval" "RSS gen"
printf '%s\n' "${ROWS[@]}"
echo "($THREADS threads; prefill: $PREFILL tokens in one window; decode: $DECODE new tokens after $PROMPT;" \
  "medians of $REPEAT runs; RSS: peak MiB, largest of the runs; read GB/s: the weights summed from the page cache)"
