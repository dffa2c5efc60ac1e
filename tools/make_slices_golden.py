#!/usr/bin/env python3
"""transformers' logits for layer stacks, the reference of tests/slices.rs.

gemma2-passthrough: the stack of fixtures/methods-case/expected/passthrough (layers 0..3 of ft_a, then 1..4 of
ft_b, written by the shared reference with its layer_types), scored as it is on 30 random tokens.

The multimodal Gemma 3 fixtures:
For each case, the stacked checkpoint is built here, independently of gemma-merge: the language model's
layers of each `[first, end)` range are renamed to consecutive output layers under the checkpoint's own
prefix (`language_model.model.layers.N.` or `model.language_model.layers.N.`); every other tensor (embeddings,
final norm, vision tower, projector) is kept; config.json gets `text_config.num_hidden_layers` and
`text_config.layer_types`, each layer's kind as transformers reads it in the source config. Then transformers
scores the fixture's golden tokens with it (eager attention, float64), as tools/make_family.py does:
  fixtures/slices/CASE/golden.safetensors  tensor `logits` [30, vocab] (float64 → float32)
  fixtures/slices/CASE/golden.json         source, slices, layer_types, tokens, mean_nll, perplexity

As a check of the procedure, the unstacked source must reproduce its own golden logits first.

Run (needs torch, transformers >= 5, safetensors; the tests do not):
    python tools/make_slices_golden.py fixtures
"""
import json
import os
import re
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma2ForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

CASES = {
    # `language_model.model.` names, a sparse published text_config (no layer_types: every 6th layer is
    # full), linear RoPE ×8 on full layers: layers 3..7 then 0..2 put the full layer 5 third.
    "gemma3-mm-tiny-stack": ("family/gemma3-mm-tiny", [(3, 7), (0, 2)]),
    # transformers 5's `model.language_model.` names, explicit text_config.layer_types (4th layer full).
    "gemma3-mm-t5-stack": ("family/gemma3-mm-t5", [(2, 4), (0, 3)]),
}

LAYER = re.compile(r"^(language_model\.model\.|model\.language_model\.)layers\.(\d+)\.(.*)$")


def load_folder(d):
    tensors = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and not f.startswith("golden"):
            tensors.update(load_file(os.path.join(d, f)))
    return tensors


def stack(tensors, ranges):
    out = {}
    for name, t in tensors.items():
        if not LAYER.match(name):
            out[name] = t
    k = 0
    for first, end in ranges:
        for i in range(first, end):
            for name, t in tensors.items():
                m = LAYER.match(name)
                if m and int(m.group(2)) == i:
                    out[f"{m.group(1)}layers.{k}.{m.group(3)}"] = t.clone()
            k += 1
    return out, k


def score(folder, tokens, cls=Gemma3ForConditionalGeneration):
    model, info = cls.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float64, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    lp = torch.log_softmax(logits, -1)
    nll = -lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].mean().item()
    return logits, nll


def save(fixtures, case, logits, nll, **fields):
    import transformers
    out = os.path.join(fixtures, "slices", case)
    os.makedirs(out, exist_ok=True)
    save_file({"logits": logits.float()}, os.path.join(out, "golden.safetensors"), metadata={"format": "pt"})
    json.dump(dict(fields, mean_nll=nll, perplexity=float(torch.tensor(nll).exp()),
                   reference=f"transformers {fields.pop('cls')} {transformers.__version__}, eager, float64"),
              open(os.path.join(out, "golden.json"), "w"), indent=1)


def main(fixtures):
    src = os.path.join(fixtures, "methods-case", "expected", "passthrough")
    g = torch.Generator().manual_seed(1)
    tokens = [2] + torch.randint(3, 384, (29,), generator=g).tolist()
    logits, nll = score(src, tokens, Gemma2ForCausalLM)
    save(fixtures, "gemma2-passthrough", logits, nll, cls="Gemma2ForCausalLM", source="methods-case/expected/passthrough",
         slices=[["ft_a", 0, 3], ["ft_b", 1, 4]], tokens=tokens)
    print("gemma2-passthrough", nll)

    for case, (source, ranges) in CASES.items():
        src = os.path.join(fixtures, source)
        golden = json.load(open(os.path.join(src, "golden.json")))
        tokens = golden["tokens"]
        own, _ = score(src, tokens)
        want = load_file(os.path.join(src, "golden.safetensors"))["logits"].double()
        err = (own - want).abs().max().item()
        assert err < 1e-5, f"{source}: transformers does not reproduce its golden logits ({err})"

        types = Gemma3Config.from_pretrained(src).text_config.layer_types
        stacked_types = [types[i] for first, end in ranges for i in range(first, end)]
        tensors, n = stack(load_folder(src), ranges)
        config = json.load(open(os.path.join(src, "config.json")))
        config["text_config"] = dict(config.get("text_config") or {}, num_hidden_layers=n,
                                     layer_types=stacked_types)
        with tempfile.TemporaryDirectory() as tmp:
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            json.dump(config, open(os.path.join(tmp, "config.json"), "w"), indent=2)
            logits, nll = score(tmp, tokens)

        save(fixtures, case, logits, nll, cls="Gemma3ForConditionalGeneration", source=source,
             slices=[list(r) for r in ranges], layer_types=stacked_types, tokens=tokens)
        print(case, n, stacked_types, nll)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
