#!/usr/bin/env python3
"""Tiny random Gemma 1 and Gemma 3 models that vary what the shared goldens (fixtures/family/gemma1-tiny,
gemma3-tiny, gemma3-mm-tiny) keep fixed, with transformers' float64 outputs.

Each folder is written by transformers (`save_pretrained`), optionally rewritten to another config form, and
scored by transformers with eager attention in float64, loaded back from the stored files:
  golden.safetensors  tensor `logits` [30, vocab] (float64 → float32) at every position of `tokens`
  golden.json         tokens, prompt (first 10 tokens), greedy (16 new tokens, no early stop),
                      mean_nll and perplexity over tokens[1:]

  gemma1-mqa-f16        Gemma 1, f16 in 3 shards, 1 kv head for 4 heads, head_dim 32 (q width 128 ≠ hidden 48),
                        rope_theta 500, legacy `hidden_act: gelu`
  gemma3-linear8-t5     Gemma 3 text in transformers 5's form (layer_types with every 3rd layer full,
                        rope_parameters with linear factor 8 on full layers, local θ 100), 6 heads / 2 kv heads
                        of 8, window 4, both soft-caps set, query_pre_attn_scalar 20, f32 in 2 shards
  gemma3-published-untied  Gemma 3 text in the published form (sliding_window_pattern 2, rope_scaling linear
                        factor 4, rope_local_base_freq), untied lm_head, MHA, window 3, bf16
  gemma3-mm-t5          Gemma3ForConditionalGeneration as transformers 5 writes it: tensors under
                        `model.language_model.`, a vision tower, linear factor 2, pattern 4, bf16

Run (needs torch, transformers >= 5, numpy, safetensors; the tests do not):
    python tools/make_family.py fixtures/family
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import (Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                          GemmaConfig, GemmaForCausalLM)


def text_cfg(**kw):
    return dict(bos_token_id=2, eos_token_id=1, pad_token_id=0, max_position_embeddings=128, **kw)


def layer_types(n, pattern):
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


VARIANTS = {
    "gemma1-mqa-f16": dict(
        cls=GemmaForCausalLM,
        cfg=lambda: GemmaConfig(**text_cfg(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                           rope_theta=500.0, hidden_act="gelu")),
        dtype=torch.float16, shard="40KB", form="gemma1"),
    "gemma3-linear8-t5": dict(
        cls=Gemma3ForCausalLM,
        cfg=lambda: Gemma3TextConfig(**text_cfg(
            vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=5, num_attention_heads=6,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=20, sliding_window=4,
            attn_logit_softcapping=20.0, final_logit_softcapping=15.0, layer_types=layer_types(5, 3),
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
        dtype=torch.float32, shard="200KB", form="t5"),
    "gemma3-published-untied": dict(
        cls=Gemma3ForCausalLM,
        cfg=lambda: Gemma3TextConfig(**text_cfg(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
            tie_word_embeddings=False, layer_types=layer_types(4, 2),
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
        dtype=torch.bfloat16, shard="1GB", form="published", pattern=2),
    "gemma3-mm-t5": dict(
        cls=Gemma3ForConditionalGeneration,
        cfg=lambda: Gemma3Config(
            text_config=dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                             sliding_window=3, max_position_embeddings=128, layer_types=layer_types(4, 4),
                             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "default",
                                                                    "rope_theta": 1e4}}),
            vision_config=dict(hidden_size=16, image_size=28, intermediate_size=32, num_attention_heads=2,
                               num_hidden_layers=1, patch_size=14, vision_use_head=False),
            mm_tokens_per_image=4, boi_token_index=300, eoi_token_index=301, image_token_index=302,
            eos_token_id=[1, 106]),
        dtype=torch.bfloat16, shard="150KB", form="t5", rename=True),
}


def rename_to_t5_layout(d):
    """Renames a multimodal checkpoint's tensors to transformers 5's module layout: `model.language_model.`,
    `model.vision_tower.`, `model.multi_modal_projector.` (transformers 5 still saves the legacy names, and
    reads both)."""
    from safetensors.torch import load_file, save_file as save_torch
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    index_path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(index_path)) if os.path.exists(index_path) else None
    new_name = lambda k: ("model.language_model." + k[len("language_model.model."):]
                          if k.startswith("language_model.model.") else
                          "model." + k if k.startswith(("vision_tower.", "multi_modal_projector.")) else k)
    for f in files:
        tensors = load_file(os.path.join(d, f))
        save_torch({new_name(k): v for k, v in tensors.items()}, os.path.join(d, f), metadata={"format": "pt"})
    if index is not None:
        index["weight_map"] = {new_name(k): v for k, v in index["weight_map"].items()}
        json.dump(index, open(index_path, "w"), indent=2)


def published(c, pattern):
    """transformers 5's Gemma 3 text config rewritten in the published (4.50) form."""
    c.pop("_sliding_window_pattern", None)
    types = c.pop("layer_types")
    assert types == layer_types(len(types), pattern), types
    c["sliding_window_pattern"] = pattern
    rp = c.pop("rope_parameters")
    full, local = rp["full_attention"], rp["sliding_attention"]
    c["rope_theta"] = full["rope_theta"]
    c["rope_local_base_freq"] = local["rope_theta"]
    c["rope_scaling"] = None if full["rope_type"] == "default" else {"rope_type": full["rope_type"],
                                                                     "factor": full["factor"]}
    return c


def gemma1(c):
    """The Gemma 1 form: rope_theta at the top level, the legacy activation name."""
    rp = c.pop("rope_parameters", None)
    if rp is not None:
        c["rope_theta"] = rp["rope_theta"]
    c.pop("hidden_activation", None)
    c["hidden_act"] = "gelu"
    return c


def main(out):
    torch.manual_seed(0)
    for name, v in VARIANTS.items():
        cfg = v["cfg"]()
        model = v["cls"](cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.normal_(0, 0.3 if "norm" in n else 0.15)
        d = os.path.join(out, name)
        model.to(v["dtype"]).save_pretrained(d, max_shard_size=v["shard"], safe_serialization=True)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(d, extra)):
                os.remove(os.path.join(d, extra))
        path = os.path.join(d, "config.json")
        c = json.load(open(path))
        if v["form"] == "published":
            c = published(c, v["pattern"])
        elif v["form"] == "gemma1":
            c = gemma1(c)
        json.dump(c, open(path, "w"), indent=2)
        if v.get("rename"):
            rename_to_t5_layout(d)
        ref, info = v["cls"].from_pretrained(d, attn_implementation="eager", dtype=torch.float64,
                                            output_loading_info=True)
        ref.eval()
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        vocab = c.get("text_config", c)["vocab_size"]
        g = torch.Generator().manual_seed(1)
        tokens = [2] + torch.randint(3, min(vocab, 300), (29,), generator=g).tolist()
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([tokens])).logits[0]
            lp = torch.log_softmax(logits, -1)
            nll = -lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].mean().item()
            prompt = tokens[:10]
            greedy = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        save_file({"logits": logits.float().numpy()}, os.path.join(d, "golden.safetensors"), metadata={"format": "pt"})
        import transformers
        golden = dict(tokens=tokens, prompt=prompt, greedy=greedy, mean_nll=nll, perplexity=float(np.exp(nll)),
                      reference=f"transformers {type(ref).__name__} {transformers.__version__}, eager, float64")
        json.dump(golden, open(os.path.join(d, "golden.json"), "w"), indent=1)
        print(name, sorted(os.listdir(d)), nll)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixtures/family")
