#!/usr/bin/env python3
"""Check that a model folder loads and runs with Hugging Face transformers.

    python tools/check_hf_load.py MODEL_DIR [TEXT_FILE] [--dtype float32|bfloat16] [--context 128]

Loads MODEL_DIR with AutoModelForCausalLM.from_pretrained (attn_implementation="eager", the reference for
the Gemma family: Gemma 1, 2 and 3, a multimodal Gemma 3 checkpoint as Gemma3ForConditionalGeneration run on
text alone) and, when MODEL_DIR holds tokenizer.json, with AutoTokenizer; runs a forward pass on a few tokens and
prints the logits' shape; with TEXT_FILE, prints the perplexity of the text, scored in non-overlapping windows of
context-1 tokens with <bos> prepended to each (as tools/make_demo.py measures it). Exit status 0 when all went
well. Needs: pip install torch transformers tokenizers safetensors.

By default the weights are upcast to float32 for the computation (bf16 weights are represented exactly);
--dtype bfloat16 computes in bf16 instead.
"""

import argparse
import math
import os
import sys


def main():
    p = argparse.ArgumentParser(description="load a model folder with transformers and run it")
    p.add_argument("model_dir")
    p.add_argument("text_file", nargs="?")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--context", type=int, default=128, help="tokens per scored window, <bos> included")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    # transformers >= 4.56 names the argument `dtype`; older versions `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, attn_implementation="eager", **{dtype_kw: dtype})
    model.eval()
    cfg = model.config
    # A multimodal checkpoint keeps the language model's settings in `text_config`.
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, {n_params} parameters, dtype {a.dtype}, "
          f"attention {cfg._attn_implementation}, transformers {transformers.__version__}")
    layer_types = getattr(text_cfg, "layer_types", None)
    n_layers = text_cfg.num_hidden_layers
    sliding_window = getattr(text_cfg, "sliding_window", None)
    if layer_types is None:
        if text_cfg.model_type == "gemma2":  # older transformers: Gemma 2 slides on the even layers
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        else:  # Gemma 1: every layer attends to everything
            layer_types = ["full_attention"] * n_layers
    if sliding_window is None:
        layer_types = ["full_attention"] * n_layers
    print(f"layer types {layer_types}, sliding_window {sliding_window}")

    tok = None
    if os.path.exists(os.path.join(a.model_dir, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        sample = "The quick brown fox jumps over the lazy dog."
        ids = tok(sample)["input_ids"]
        print(f"tokenizer: {type(tok).__name__}, vocab {len(tok)}, bos {tok.bos_token_id}, eos {tok.eos_token_id}, "
              f"pad {tok.pad_token_id}, unk {tok.unk_token_id}")
        print(f"  {sample!r} -> {ids}")
        back = tok.decode(ids, skip_special_tokens=True)
        print(f"  decodes back: {back == sample}")
        if ids[0] != (getattr(cfg, "bos_token_id", None) or text_cfg.bos_token_id):
            print("  WARNING: the tokenizer does not prepend <bos>")
    else:
        bos = next((b for b in (getattr(cfg, "bos_token_id", None), getattr(text_cfg, "bos_token_id", None))
                    if b is not None), 2)
        ids = [bos, 10, 20, 30, 40, 50]
        print("tokenizer: none (no tokenizer.json); using ids", ids)

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    print(f"logits shape {tuple(logits.shape)}, dtype {logits.dtype}, finite {bool(torch.isfinite(logits).all())}")
    ok = bool(torch.isfinite(logits).all())

    if a.text_file:
        if tok is None:
            sys.exit("a text file needs the model's tokenizer.json")
        with open(a.text_file, encoding="utf-8") as f:
            text = f.read()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        bos = tok.bos_token_id
        n = a.context - 1
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(ids), n):
                x = torch.tensor([[bos] + ids[i:i + n]])
                lg = model(input_ids=x).logits.float()
                total += F.cross_entropy(lg[0, :-1], x[0, 1:], reduction="sum").item()
                count += x.shape[1] - 1
        ppl = math.exp(total / count)
        print(f"perplexity of {a.text_file}: {ppl:.3f} ({count} tokens, windows of <bos> + {n})")
        ok &= math.isfinite(ppl)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
