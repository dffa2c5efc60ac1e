#!/usr/bin/env bash
# Prints the README's demo table with gemma-merge's own commands: perplexity on the held-out target and
# pre-training texts, and KL(model ‖ sft) on the target text, for sft, each run's last checkpoint, each
# EMA, the SLERP merge and LITI at several η. Needs a release build and python3 (JSON formatting only).
#   bash tools/demo_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GM=${GM:-target/release/gemma-merge}
D=fixtures/demo
T=$D/heldout-target.txt
P=$D/heldout-pretrain.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$GM" front recipes/demo-warp.yaml --text "$T" --eta 0.1,0.3,0.5,1.0 --json > "$tmp/front-target.json"
"$GM" front recipes/demo-warp.yaml --text "$P" --eta 0.1,0.3,0.5,1.0 --json > "$tmp/front-pretrain.json"
# The EMAs (the SLERP's input policies) are the markers of `front`'s table.
"$GM" front recipes/demo-warp.yaml --text "$T" --eta 1.0 > "$tmp/front-target.txt"
"$GM" front recipes/demo-warp.yaml --text "$P" --eta 1.0 > "$tmp/front-pretrain.txt"
"$GM" eval $D/sft --text "$T" --json > "$tmp/sft-t.json"
"$GM" eval $D/sft --text "$P" --json > "$tmp/sft-p.json"
for r in run_a run_b; do
  "$GM" compare $D/$r/step-300 --reference $D/sft --text "$T" --json > "$tmp/$r-t.json"
  "$GM" eval $D/$r/step-300 --text "$P" --json > "$tmp/$r-p.json"
done

python3 - "$tmp" <<'PY'
import json, sys, re
t = sys.argv[1]
j = lambda n: json.load(open(f"{t}/{n}"))
rows = [("sft (init)", j("sft-t.json")["perplexity"], j("sft-p.json")["perplexity"], 0.0)]
for r in ["run_a", "run_b"]:
    c = j(f"{r}-t.json")
    rows.append((f"{r}/step-300", c["perplexity"], j(f"{r}-p.json")["perplexity"], c["kl"]))
def markers(name):
    out = {}
    for line in open(f"{t}/{name}"):
        m = re.match(r"\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+(\S+) \(policy\)", line)
        if m:
            out[m.group(4)] = (float(m.group(1)), float(m.group(2)))
    return out
mt, mp = markers("front-target.txt"), markers("front-pretrain.txt")
for name in sorted(mt):
    rows.append((f"EMA {name}", mt[name][1], mp[name][1], mt[name][0]))
ft, fp = j("front-target.json"), j("front-pretrain.json")
for a, b in zip(ft, fp):
    label = "SLERP (= LITI η=1.0)" if a["eta"] == 1.0 else f"LITI η={a['eta']}"
    rows.append((label, a["perplexity"], b["perplexity"], a["kl"]))
print("| model | perplexity, target text ↓ | perplexity, pre-training text ↓ | KL(model ‖ sft), target text |")
print("|---|---:|---:|---:|")
for name, pt, pp, kl in rows:
    print(f"| {name} | {pt:.2f} | {pp:.2f} | {kl:.4f} |")
PY
