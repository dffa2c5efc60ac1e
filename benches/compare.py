#!/usr/bin/env python3
"""Helpers for the side-by-side benchmarks (benches/forward.sh, benches/merge.sh); never used by tests or CI.

  compare.py tokenizer DIR            writes DIR/tokenizer.model: a SentencePiece model with one piece per id
                                      of DIR/config.json's vocabulary (<pad> <eos> <bos> <unk>, then ▁t4 ...), so
                                      that llama.cpp's convert_hf_to_gguf.py can convert a synthetic checkpoint
  compare.py torch DIR PREFILL_IDS PROMPT_IDS DECODE THREADS
                                      PyTorch + transformers Gemma2ForCausalLM in bfloat16: one prefill pass over
                                      PREFILL_IDS (comma-separated) and DECODE one-token steps with the KV cache after
                                      PROMPT_IDS; prints {"prefill_tokens_per_second": ..., "decode_tokens_per_second": ...}
  compare.py deviation EXACT.safetensors FAST.safetensors
                                      two `eval --dump-logits` files (exact and --fast): mean and max KL(exact‖fast)
                                      per position, max |logit difference|, top-1 agreement (numpy + safetensors)
"""
import json
import sys
import time


def tokenizer(folder):
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = json.load(open(f"{folder}/config.json"))["vocab_size"]
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab
    m.trainer_spec.pad_id, m.trainer_spec.eos_id, m.trainer_spec.bos_id, m.trainer_spec.unk_id = 0, 1, 2, 3
    m.normalizer_spec.add_dummy_prefix = False
    for i, (piece, kind) in enumerate([("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2)]):
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for i in range(4, vocab):
        m.pieces.add(piece=f"\u2581t{i}", score=-float(i), type=1)
    with open(f"{folder}/tokenizer.model", "wb") as f:
        f.write(m.SerializeToString())


def torch_bench(folder, prefill_ids, prompt_ids, decode, threads):
    import torch
    from transformers import Gemma2ForCausalLM

    torch.set_num_threads(threads)
    model = Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.eval()
    prefill = torch.tensor([[int(t) for t in prefill_ids.split(",")]])
    prompt = torch.tensor([[int(t) for t in prompt_ids.split(",")]])
    with torch.inference_mode():
        model(prompt[:, :4])  # warm-up
        t = time.perf_counter()
        model(prefill, logits_to_keep=0)
        prefill_s = time.perf_counter() - t
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t
    print(json.dumps({
        "prefill_tokens_per_second": prefill.shape[1] / prefill_s,
        "decode_tokens_per_second": decode / decode_s,
    }, separators=(",", ":")))


def deviation(exact_path, fast_path):
    import numpy as np
    from safetensors.numpy import load_file

    a = load_file(exact_path)["logits"].astype(np.float64)
    b = load_file(fast_path)["logits"].astype(np.float64)

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    la, lb = log_softmax(a), log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(axis=1)
    print(json.dumps({
        "positions": int(a.shape[0]),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
    }))


if __name__ == "__main__":
    if sys.argv[1] == "tokenizer":
        tokenizer(sys.argv[2])
    elif sys.argv[1] == "deviation":
        deviation(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "torch":
        torch_bench(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
