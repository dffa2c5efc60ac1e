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
# file summed from the page cache by numpy with THREADS threads, when python3 + numpy are there). In the
# side-by-side rounds that baseline is also measured right after gemma-merge's decode in each round, and the
# decode's share of it is printed per round and as the median: this VM's bandwidth moves between rounds.
# "prefill GFLOP/s" counts 2 FLOPs per weight per token (matrix products only; attention is extra).
#
# Side by side (optional, never in CI): with PYTHON set to a python that has torch, transformers,
# sentencepiece and gguf, each round also runs PyTorch + transformers Gemma2ForCausalLM in bfloat16
# (benches/compare.py), and with LLAMA_SRC (a llama.cpp source tree, e.g. the one vendored in the
# llama-cpp-python source package) plus LLAMA_BENCH (and optionally LLAMA_BENCH_AVX2, a build with
# GGML_NATIVE=OFF GGML_AVX512=OFF) llama.cpp's llama-bench on the model converted once to a bf16 GGUF
# with LLAMA_SRC/convert_hf_to_gguf.py. The engines alternate within each round; the table gives
# medians and the ratios of gemma-merge to each. Prefill here is `generate`'s prompt pass (logits of the
# last position only, as llama-bench and the PyTorch script do); "eval t/s" is `eval` (every position's
# logits and log-probabilities). `--fast` rows use bf16 products (AVX512-BF16) where the CPU has them.
#
# Environment: BENCH_DIR (default /tmp/gemma-merge-bench; never inside the repository), SHAPE (2b),
# LAYERS ("4"), DTYPE (bfloat16), PREFILL (128), PROMPT (16), DECODE (32), REPEAT (3; medians),
# THREADS (default: all cores), KEEP=1 keeps the models for the next run (default: each is deleted once measured),
# PYTHON, LLAMA_SRC, LLAMA_BENCH, LLAMA_BENCH_AVX2 (see above).
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
  "${PYTHON:-python3}" - "$@" <<'PY' 2>/dev/null || echo "n/a"
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

PYTHON=${PYTHON:-}
LLAMA_SRC=${LLAMA_SRC:-}
LLAMA_BENCH=${LLAMA_BENCH:-}
LLAMA_BENCH_AVX2=${LLAMA_BENCH_AVX2:-}
# tokens/s of llama-bench's JSON for the prompt (pp) or generation (tg) test.
llama_ts() {
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); k=sys.argv[2]
print([x["avg_ts"] for x in r if (x["n_prompt"] > 0) == (k == "pp")][0])' "$1" "$2"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }

ROWS=()
CMP_ROWS=()
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
  gguf=""
  if [[ -n "$LLAMA_SRC" && -n "$LLAMA_BENCH" && -n "$PYTHON" ]]; then
    gguf="$d.gguf"
    if [[ ! -f "$gguf" ]]; then
      echo "== converting to $gguf" >&2
      [[ -f "$d/tokenizer.model" ]] || "$PYTHON" "$ROOT/benches/compare.py" tokenizer "$d"
      "$PYTHON" "$LLAMA_SRC/convert_hf_to_gguf.py" "$d" --outtype bf16 --outfile "$gguf.tmp" >&2 && mv "$gguf.tmp" "$gguf"
    fi
  fi
  # Warm the page cache (and check that both commands run).
  "${GM[@]}" -q eval "$d" --token-ids "$(random_ids 4 3)" --json > /dev/null
  pre=(); dec=(); rss_e=(); rss_g=()
  declare -A C=()
  for r in $(seq "$REPEAT"); do
    /usr/bin/time -v -o "$d/eval.time" "${GM[@]}" -q eval "$d" --token-ids "$prefill_ids" --json > "$d/eval.json"
    /usr/bin/time -v -o "$d/gen.time" "${GM[@]}" -q generate "$d" --token-ids "$prompt_ids" \
      --max-new-tokens "$DECODE" --json > "$d/gen.json"
    pre+=("$(json_num tokens_per_second "$d/eval.json")")
    dec+=("$(json_num decode_tokens_per_second "$d/gen.json")")
    rss_e+=("$(rss_of "$d/eval.time")"); rss_g+=("$(rss_of "$d/gen.time")")
    echo "   run $r: eval ${pre[-1]} tokens/s, decode ${dec[-1]} tokens/s, peak RSS" \
      "$(( ${rss_e[-1]} / 1024 )) / $(( ${rss_g[-1]} / 1024 )) MiB" >&2
    if [[ -n "$PYTHON$gguf" ]]; then
      # Side by side, alternating: prefill of PREFILL tokens (last-position logits) and DECODE steps.
      for mode in exact fast; do
        flag=(); [[ $mode == fast ]] && flag=(--fast)
        "${GM[@]}" -q generate "$d" --token-ids "$prefill_ids" --max-new-tokens "$DECODE" "${flag[@]}" --json > "$d/cmp.json"
        C[gm-$mode-pp]+="$(json_num prefill_tokens_per_second "$d/cmp.json") "
        C[gm-$mode-tg]+="$(json_num decode_tokens_per_second "$d/cmp.json") "
      done
      # The read bandwidth of this round, right after our decode: the decode's share of it per round.
      bwr=$(bandwidth "$THREADS" "${files[@]}")
      if [[ "$bwr" != n/a ]]; then
        C[read-gbs]+="$bwr "
        C[gm-tg-share]+="$(awk -v b="$bytes" -v t="$(echo ${C[gm-exact-tg]} | awk '{print $NF}')" -v r="$bwr" 'BEGIN { printf "%.3f", b * t / 1e9 / r }') "
      fi
      if [[ -n "$PYTHON" ]]; then
        /usr/bin/time -v -o "$d/torch.time" "$PYTHON" "$ROOT/benches/compare.py" torch "$d" "$prefill_ids" "$prompt_ids" "$DECODE" "$THREADS" > "$d/torch.json"
        C[torch-pp]+="$(json_num prefill_tokens_per_second "$d/torch.json") "
        C[torch-tg]+="$(json_num decode_tokens_per_second "$d/torch.json") "
        C[torch-rss]+="$(rss_of "$d/torch.time") "
      fi
      if [[ -n "$gguf" ]]; then
        for b in native avx2; do
          exe=$LLAMA_BENCH; [[ $b == avx2 ]] && exe=$LLAMA_BENCH_AVX2
          [[ -n "$exe" ]] || continue
          /usr/bin/time -v -o "$d/llama.time" "$exe" -m "$gguf" -p "$PREFILL" -n "$DECODE" -t "$THREADS" -r 1 -o json > "$d/llama.json" 2> /dev/null
          C[llama-$b-pp]+="$(llama_ts "$d/llama.json" pp) "
          C[llama-$b-tg]+="$(llama_ts "$d/llama.json" tg) "
          C[llama-$b-rss]+="$(rss_of "$d/llama.time") "
        done
      fi
      echo "   round $r side by side: $(for k in "${!C[@]}"; do printf '%s=%s ' "$k" "$(echo ${C[$k]} | awk '{print $NF}')"; done)" >&2
    fi
  done
  if [[ -n "$PYTHON$gguf" ]]; then
    med() { printf '%s\n' ${C[$1]:-0} | median; }
    gx=$(med gm-exact-pp); gf=$(med gm-fast-pp); gd=$(med gm-exact-tg); gdf=$(med gm-fast-tg)
    CMP_ROWS+=("$(printf '%-10s %-26s %10s %10s %9s' "$SHAPE-L$n" "gemma-merge (exact)" "$gx" "$gd" "$(( $(printf '%s\n' "${rss_g[@]}" | maximum) / 1024 ))")")
    CMP_ROWS+=("$(printf '%-10s %-26s %10s %10s %9s' "" "gemma-merge --fast" "$gf" "$gdf" "")")
    for e in torch llama-native llama-avx2; do
      [[ -n "${C[$e-pp]:-}" ]] || continue
      p=$(med "$e-pp"); t=$(med "$e-tg"); rs=$(printf '%s\n' ${C[$e-rss]} | maximum)
      CMP_ROWS+=("$(printf '%-10s %-26s %10.1f %10.2f %9s   exact/it: prefill %s decode %s; fast/it: prefill %s decode %s' "" "$e" "$p" "$t" "$(( rs / 1024 ))" \
        "$(ratio "$gx" "$p")" "$(ratio "$gd" "$t")" "$(ratio "$gf" "$p")" "$(ratio "$gdf" "$t")")")
    done
    if [[ -n "${C[read-gbs]:-}" ]]; then
      CMP_ROWS+=("$(printf '%-10s exact decode read %s of the read bandwidth measured right after it in each round (rounds: %s; read GB/s: %s)' "" \
        "$(med gm-tg-share)" "$(echo ${C[gm-tg-share]})" "$(echo ${C[read-gbs]})")")
    fi
  fi
  p=$(printf '%s\n' "${pre[@]}" | median)
  g=$(printf '%s\n' "${dec[@]}" | median)
  re=$(printf '%s\n' "${rss_e[@]}" | maximum)
  rg=$(printf '%s\n' "${rss_g[@]}" | maximum)
  bw=$(bandwidth "$THREADS" "${files[@]}")
  ROWS+=("$(awk -v m="$SHAPE-L$n" -v b="$bytes" -v e="$elem" -v p="$p" -v g="$g" -v re="$re" -v rg="$rg" -v bw="$bw" \
    'BEGIN { printf "%-10s %9.2f %11.1f %9.1f %10.2f %10.1f %10s %9.0f %9.0f", m, b / 1e9, p, 2 * b / e * p / 1e9, g, b * g / 1e9, bw, re / 1024, rg / 1024 }')")
  if [[ "$KEEP" != 1 ]]; then rm -rf "$d"; fi
done

printf '\n%-10s %9s %11s %9s %10s %10s %10s %9s %9s\n' model "GB" "eval t/s" "GFLOP/s" "decode t/s" "decode GB/s" "read GB/s" "RSS eval" "RSS gen"
printf '%s\n' "${ROWS[@]}"
if [[ ${#CMP_ROWS[@]} -gt 0 ]]; then
  printf '\n%-10s %-26s %10s %10s %9s\n' model engine "prefill t/s" "decode t/s" "RSS MiB"
  printf '%s\n' "${CMP_ROWS[@]}"
  echo "(side by side, alternating in each of $REPEAT rounds, medians; prefill: $PREFILL tokens, last-position logits;" \
    "decode: $DECODE one-token steps; gemma-merge decode here follows the $PREFILL-token prompt)"
fi
echo "($THREADS threads; eval: $PREFILL tokens in one window, every position's logits; decode: $DECODE new tokens after $PROMPT;" \
  "medians of $REPEAT runs; RSS: peak MiB, largest of the runs; read GB/s: the weights summed from the page cache)"
