#!/usr/bin/env python3
"""fixtures/methods-case2: mergekit's own outputs on a tiny Gemma 3, four fine-tunes in mixed dtypes.

Builds, deterministically (fixed seeds, CPU):
  base      Gemma3ForCausalLM (text only), bf16, as transformers 5 writes it (explicit layer_types,
            every 3rd layer full attention), 6 layers, hidden 32, vocabulary 256
  ft_a      bf16; its embeddings and layer 0's q_norm are frozen (task vector exactly zero there)
  ft_b      f16
  ft_c      f32
  ft_d      bf16, in 2 shards with model.safetensors.index.json
  mm_base   Gemma3ForConditionalGeneration (text + a 2-layer SigLIP tower), bf16, in the published
            tensor layout (`language_model.model.…`, `vision_tower.vision_model.…`, `multi_modal_projector.…`):
            mergekit 0.1.5 cannot read transformers 5's own layout (`model.language_model.…`,
            `model.vision_tower.…`: "Tensor vision_tower.vision_model.embeddings.patch_embedding.bias required
            but not present"), so that is the only multimodal form both tools read
  mm_a      f32 fine-tune of mm_base
  mm_b      bf16 fine-tune of mm_base
Each fine-tune is base + ε·rms(base)·(0.6·S + 0.8·R_i) per tensor (S shared by all fine-tunes, R_i its own),
rounded once to its dtype, so task vectors share a direction (TIES' sign election, Model Stock's angle matter).

Then writes the mergekit configs below into mergekit/ and runs mergekit-yaml on each from that folder
(paths `../base` etc. are relative to the current directory, as mergekit resolves them), keeping only the
tensors and config.json in expected/<config>/. DARE configs are written but not run: torch's random masks
cannot be reproduced, the tests check DARE's own properties instead.

Run (torch, transformers 5, mergekit 0.1.5, CPU is enough; about a minute):
    python tools/make_methods_refs.py fixtures/methods-case2 --mergekit /path/to/venv/bin/mergekit-yaml
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig


def layer_types(n, pattern):
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def text_config():
    return Gemma3TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        max_position_embeddings=128, layer_types=layer_types(6, 3), bos_token_id=2, eos_token_id=1,
        pad_token_id=0)


def mm_config():
    return Gemma3Config(
        text_config=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=3, max_position_embeddings=128, layer_types=layer_types(4, 2)),
        vision_config=dict(hidden_size=16, image_size=28, intermediate_size=32, num_attention_heads=2,
                           num_hidden_layers=2, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=4, boi_token_index=250, eoi_token_index=251, image_token_index=252)


def base_values(model, seed):
    """Replaces the random init by values with some spread everywhere (norm weights included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "embed" in name else (0.2 if p.dim() == 1 else 0.06)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def fine_tune(base_sd, seed, eps, shared_seed, frozen=()):
    """{name: f32 tensor}: base + eps·rms·(0.6·S + 0.8·R) per tensor; `frozen` names keep the base."""
    gs = torch.Generator().manual_seed(shared_seed)
    gr = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(base_sd):
        b = base_sd[name].float()
        s = torch.randn(b.shape, generator=gs)
        r = torch.randn(b.shape, generator=gr)
        if any(f in name for f in frozen):
            out[name] = b.clone()
            continue
        rms = b.pow(2).mean().sqrt().clamp(min=1e-3)
        out[name] = b + eps * rms * (0.6 * s + 0.8 * r)
    return out


def published_name(k):
    """transformers 5's multimodal tensor names → the published checkpoints' (which mergekit reads)."""
    for new, old in (("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if k.startswith(new):
            return old + k[len(new):]
    return k


def save_model(folder, config, arch, tensors, dtype, shards=1, rename=None):
    """Writes config.json (architectures, dtype set) and the tensors in `dtype`, in `shards` files (an
    index when > 1)."""
    os.makedirs(folder, exist_ok=True)
    cfg = json.loads(config.to_json_string())
    cfg["architectures"] = [arch]
    cfg["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    names = sorted(tensors)
    data = {(rename(n) if rename else n): tensors[n].to(dtype).contiguous() for n in names}
    keys = list(data)
    if shards == 1:
        save_file(data, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = {k: data[k] for k in keys[s * per:(s + 1) * per]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


def build_models(root):
    torch.manual_seed(0)
    cfg = text_config()
    model = Gemma3ForCausalLM(cfg)
    base_values(model, 1)
    # The base as stored (bf16), widened: every fine-tune starts from exactly these values.
    base = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_model(os.path.join(root, "base"), cfg, "Gemma3ForCausalLM", base, torch.bfloat16)
    specs = [("ft_a", 11, 0.05, torch.bfloat16, 1, ("embed_tokens", "layers.0.self_attn.q_norm")),
             ("ft_b", 12, 0.04, torch.float16, 1, ()),
             ("ft_c", 13, 0.06, torch.float32, 1, ()),
             ("ft_d", 14, 0.03, torch.bfloat16, 2, ())]
    for name, seed, eps, dtype, shards, frozen in specs:
        save_model(os.path.join(root, name), cfg, "Gemma3ForCausalLM", fine_tune(base, seed, eps, 100, frozen), dtype, shards)

    mcfg = mm_config()
    mm = Gemma3ForConditionalGeneration(mcfg)
    base_values(mm, 2)
    mbase = {k: v.to(torch.bfloat16).float() for k, v in mm.state_dict().items() if k != "lm_head.weight"}
    save_model(os.path.join(root, "mm_base"), mcfg, "Gemma3ForConditionalGeneration", mbase, torch.bfloat16, rename=published_name)
    for name, seed, eps, dtype in [("mm_a", 21, 0.05, torch.float32), ("mm_b", 22, 0.04, torch.bfloat16)]:
        save_model(os.path.join(root, name), mcfg, "Gemma3ForConditionalGeneration", fine_tune(mbase, seed, eps, 200), dtype,
                   rename=published_name)


# name → (config text, True: run mergekit | False: do not | "tensors": keep the tensors of a run that fails
# writing config.json)
CONFIGS = {
    # TIES with everything at once: per-model gradients and filters for weight and density, a negative
    # weight, a shared default density, lambda, normalize off, int8_mask; four fine-tunes, mixed dtypes.
    "ties": ("""
        merge_method: ties
        base_model: ../base
        models:
          - model: ../ft_a
            parameters:
              weight: [1.0, 0.5]
              density:
                - filter: mlp
                  value: [0.3, 0.7]
                - value: 0.5
          - model: ../ft_b
            parameters: {weight: 0.8, density: 0.6}
          - model: ../ft_c
            parameters:
              weight: -0.4
              density:
                - filter: self_attn
                  value: 0.9
                - value: 0.4
          - model: ../ft_d
            parameters:
              weight:
                - filter: embed
                  value: 0.2
                - value: [0.3, 0.9, 0.6]
        parameters:
          density: 0.5
          lambda: 1.3
          normalize: false
          int8_mask: true
        dtype: float32
        out_dtype: bfloat16
        """, True),
    # Defaults (normalize on), rescale on, and no dtype at all: mergekit computes and writes each tensor in
    # the promotion of its inputs' dtypes (bf16, f16, f32 → f32).
    "ties_promoted": ("""
        merge_method: ties
        base_model: ../base
        models:
          - model: ../ft_a
            parameters: {weight: 0.5, density: 0.4}
          - model: ../ft_b
            parameters: {weight: 0.3, density: 0.7}
          - model: ../ft_c
            parameters: {weight: 0.7, density: 0.5}
        parameters:
          rescale: true
        """, True),
    "task_arithmetic": ("""
        merge_method: task_arithmetic
        base_model: ../base
        models:
          - model: ../ft_a
            parameters: {weight: 0.6}
          - model: ../ft_b
            parameters: {weight: 0.5}
          - model: ../ft_c
            parameters: {weight: -0.3}
          - model: ../ft_d
            parameters:
              weight:
                - filter: mlp
                  value: [0.1, 0.4]
                - value: 0.2
        parameters:
          lambda: 0.7
          normalize: true
        dtype: float32
        out_dtype: float16
        """, True),
    # Only `dtype: bfloat16`: mergekit loads every input as bf16 and computes task vectors in bf16.
    "task_arithmetic_bf16": ("""
        merge_method: task_arithmetic
        base_model: ../base
        models:
          - model: ../ft_a
            parameters: {weight: 0.6}
          - model: ../ft_c
            parameters: {weight: -0.3}
          - model: ../ft_d
            parameters: {weight: 0.5}
        parameters:
          lambda: 0.8
        dtype: bfloat16
        """, True),
    # All inputs bf16 and no dtype: the promotion is bf16, so mergekit computes in bf16 here too.
    "ties_all_bf16": ("""
        merge_method: ties
        base_model: ../base
        models:
          - model: ../ft_a
            parameters: {weight: 0.6, density: 0.5}
          - model: ../ft_d
            parameters: {weight: 0.4, density: 0.5}
        """, True),
    # `dtype: float16` with rescale: every step in float16 (ft_c's values rounded to it on loading).
    "ties_f16": ("""
        merge_method: ties
        base_model: ../base
        models:
          - model: ../ft_b
            parameters: {weight: 0.7, density: 0.5}
          - model: ../ft_c
            parameters: {weight: 0.5, density: [0.3, 0.8]}
          - model: ../ft_d
            parameters: {weight: -0.2, density: 0.6}
        parameters:
          rescale: true
          lambda: 1.5
        dtype: float16
        out_dtype: bfloat16
        """, True),
    "breadcrumbs_ties": ("""
        merge_method: breadcrumbs_ties
        base_model: ../base
        models:
          - model: ../ft_a
            parameters: {weight: 1.0, density: [0.6, 0.9], gamma: 0.05}
          - model: ../ft_b
            parameters: {weight: 0.7, density: 0.8, gamma: 0.02}
          - model: ../ft_c
            parameters: {weight: 0.5, density: 0.7}
        parameters:
          gamma: 0.1
          lambda: 0.9
        dtype: float32
        out_dtype: bfloat16
        """, True),
    "breadcrumbs": ("""
        merge_method: breadcrumbs
        base_model: ../base
        models:
          - model: ../ft_b
            parameters: {weight: 0.5, density: 0.8, gamma: 0.05}
          - model: ../ft_d
            parameters: {weight: 0.5, density: 0.6, gamma: 0.1}
        parameters:
          rescale: true
        dtype: float32
        out_dtype: float32
        """, True),
    "dare_ties": ("""
        merge_method: dare_ties
        base_model: ../base
        models:
          - model: ../ft_a
            parameters: {weight: 0.5, density: 0.4}
          - model: ../ft_b
            parameters: {weight: 0.3, density: 0.7}
          - model: ../ft_c
            parameters: {weight: -0.2, density: 0.5}
          - model: ../ft_d
            parameters: {weight: 0.4, density: [0.2, 0.8]}
        dtype: float32
        out_dtype: float32
        """, False),
    "dare_linear": ("""
        merge_method: dare_linear
        base_model: ../base
        models:
          - model: ../ft_c
            parameters: {weight: 0.7, density: 0.3}
          - model: ../ft_d
            parameters: {weight: 0.3, density: 0.6}
        dtype: float32
        out_dtype: float32
        """, False),
    "model_stock": ("""
        merge_method: model_stock
        base_model: ../base
        models:
          - model: ../ft_a
          - model: ../ft_b
          - model: ../ft_c
          - model: ../ft_d
        dtype: float32
        out_dtype: float32
        """, True),
    "model_stock_bf16": ("""
        merge_method: model_stock
        base_model: ../base
        models:
          - model: ../ft_a
          - model: ../ft_b
          - model: ../ft_d
        dtype: bfloat16
        """, True),
    "model_stock_filter_wise": ("""
        merge_method: model_stock
        base_model: ../base
        models:
          - model: ../ft_b
          - model: ../ft_c
          - model: ../ft_d
        parameters:
          filter_wise: true
        dtype: float32
        out_dtype: bfloat16
        """, True),
    "slerp": ("""
        merge_method: slerp
        base_model: ../base
        slices:
          - sources:
              - model: ../base
                layer_range: [0, 6]
              - model: ../ft_c
                layer_range: [0, 6]
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.4
        dtype: float32
        out_dtype: bfloat16
        """, True),
    # ft_a's embeddings are frozen: one task vector is exactly zero there.
    "nuslerp": ("""
        merge_method: nuslerp
        base_model: ../base
        models:
          - model: ../ft_a
            parameters: {weight: 1.0}
          - model: ../ft_b
            parameters: {weight: 3.0}
        dtype: float32
        out_dtype: float32
        """, True),
    "nuslerp_bf16": ("""
        merge_method: nuslerp
        base_model: ../base
        models:
          - model: ../ft_c
            parameters: {weight: 1.0}
          - model: ../ft_d
            parameters: {weight: 1.0}
        dtype: bfloat16
        """, True),
    "slerp_bf16": ("""
        merge_method: slerp
        base_model: ../ft_b
        models:
          - model: ../ft_b
          - model: ../ft_c
        parameters:
          t: [0.2, 0.8]
        dtype: bfloat16
        """, True),
    "nuslerp_rows": ("""
        merge_method: nuslerp
        models:
          - model: ../ft_c
            parameters: {weight: 2.0}
          - model: ../ft_d
            parameters: {weight: 1.0}
        parameters:
          nuslerp_flatten: false
          nuslerp_row_wise: true
        dtype: float32
        out_dtype: bfloat16
        """, True),
    "linear": ("""
        merge_method: linear
        models:
          - model: ../ft_a
            parameters: {weight: 2.0}
          - model: ../ft_b
            parameters: {weight: 1.0}
          - model: ../ft_c
            parameters:
              weight:
                - filter: self_attn
                  value: [0.5, 2.0]
                - value: 1.0
          - model: ../ft_d
            parameters: {weight: 0.5}
        dtype: float32
        out_dtype: float16
        """, True),
    "linear_no_normalize": ("""
        merge_method: linear
        models:
          - model: ../base
            parameters: {weight: 1.5}
          - model: ../ft_b
            parameters: {weight: -0.75}
          - model: ../ft_c
            parameters: {weight: 0.5}
        parameters:
          normalize: false
        dtype: float32
        """, True),
    # Only `dtype: bfloat16`: inputs are loaded as bf16 (ft_b and ft_c rounded), summed in f32.
    "linear_bf16": ("""
        merge_method: linear
        models:
          - model: ../ft_a
            parameters: {weight: 1.0}
          - model: ../ft_b
            parameters: {weight: 1.0}
          - model: ../ft_c
            parameters: {weight: 1.0}
        dtype: bfloat16
        """, True),
    "passthrough": ("""
        merge_method: passthrough
        slices:
          - sources:
              - model: ../base
                layer_range: [0, 3]
          - sources:
              - model: ../ft_c
                layer_range: [2, 5]
        dtype: float32
        out_dtype: bfloat16
        """, True),
    # No dtype: every tensor keeps its source's dtype (bf16 from base, f32 from ft_c). 4 layers: mergekit
    # writes the tensors, then fails on config.json (transformers 5 refuses num_hidden_layers 4 with the
    # base's 6 layer_types), so expected/ holds its tensors only.
    "passthrough_mixed": ("""
        merge_method: passthrough
        slices:
          - sources:
              - model: ../ft_c
                layer_range: [4, 6]
          - sources:
              - model: ../base
                layer_range: [0, 2]
        """, "tensors"),
    # The multimodal checkpoint: mergekit merges every module (language model, vision tower, projector)
    # with the same method; gradients run over each module's own layers.
    "mm_ties": ("""
        merge_method: ties
        base_model: ../mm_base
        models:
          - model: ../mm_a
            parameters:
              weight: 1.0
              density: [0.3, 0.9]
          - model: ../mm_b
            parameters:
              weight: [0.2, 1.0]
              density: 0.6
        dtype: float32
        out_dtype: bfloat16
        """, True),
    "mm_linear": ("""
        merge_method: linear
        models:
          - model: ../mm_base
            parameters: {weight: 1.0}
          - model: ../mm_a
            parameters:
              weight:
                - filter: vision_tower
                  value: [0.0, 2.0]
                - value: [1.0, 3.0]
        dtype: float32
        out_dtype: float32
        """, True),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--mergekit", default="mergekit-yaml")
    p.add_argument("--only", nargs="*", help="run mergekit on these configs only (models are rebuilt anyway)")
    a = p.parse_args()
    root = os.path.abspath(a.out)
    torch.set_num_threads(1)
    build_models(root)
    cfg_dir = os.path.join(root, "mergekit")
    os.makedirs(cfg_dir, exist_ok=True)
    for name, (text, run) in CONFIGS.items():
        with open(os.path.join(cfg_dir, name + ".yml"), "w") as f:
            f.write(textwrap.dedent(text).lstrip())
    for name, (_, run) in CONFIGS.items():
        if not run or (a.only and name not in a.only):
            continue
        out = os.path.join(root, "expected", name)
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [a.mergekit, name + ".yml", tmp, "--allow-crimes", "--no-copy-tokenizer", "--quiet",
               "--random-seed", "0"]
        print("+", " ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, cwd=cfg_dir)
        if done.returncode != 0 and run != "tensors":
            sys.exit(f"mergekit failed on {name}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for f in sorted(os.listdir(tmp)):
            if f.endswith(".safetensors") or f == "model.safetensors.index.json" or (
                    f == "config.json" and run is True):
                shutil.copy(os.path.join(tmp, f), os.path.join(out, f))
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
