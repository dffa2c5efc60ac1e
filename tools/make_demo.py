#!/usr/bin/env python3
"""Build the tiny Gemma 2 "demo family" shipped in fixtures/demo/.

What it makes (everything under --out, default fixtures/demo):

  sft/                      a tiny Gemma2ForCausalLM (~0.92 M parameters) "pre-trained" from scratch on the
                            prose of Python's stdlib `pydoc_data/topics.py` (PSF licence): the WARP init θ_init.
  run_a/step-{100,200,300}/ two fine-tuning runs from sft on a *different* text distribution, the GNU licence
  run_b/step-{100,200,300}/ texts in /usr/share/common-licenses (Debian base-files; verbatim copying permitted).
                            Same hyper-parameters, different seeds (data order). Nothing is merged here: these
                            are the inputs of a WARP round (recipes/demo-warp.yaml).
  heldout-pretrain.txt      held-out pydoc topics (never trained on) to measure forgetting;
  heldout-target.txt        held-out licence text (LGPL-3, whole and verbatim) to measure the fine-tuning gain;
  training-log.txt          settings, losses, and the held-out perplexities of the saved bf16 checkpoints.

Every model folder is in the published Gemma 2 layout: `model.safetensors` in bfloat16 (names
`model.embed_tokens.weight`, `model.layers.N.…`, `model.norm.weight`; no `lm_head.weight`, the output projection
is the tied embedding; header metadata {"format": "pt"}), a published-style `config.json` (rope_theta,
sliding_window, query_pre_attn_scalar, soft-caps, hidden_activation, torch_dtype bfloat16, bos 2 / eos 1 / pad 0),
and a Gemma-style tokenizer (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`).

The tokenizer is trained here with the `tokenizers` library: BPE with byte fallback (<0x00>..<0xFF>),
normalizer Replace(" " -> "▁") with no dummy prefix, no pre-tokenizer in the saved file (as in Gemma's
tokenizer.json), decoder Replace("▁" -> " ") + ByteFallback + Fuse, and a post-processor that prepends <bos>.
Special tokens: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4 (as in Gemma; transformers' GemmaTokenizer adds a
<mask> of its own when the vocabulary lacks one), <start_of_turn>=5, <end_of_turn>=6, bytes <0x00>..<0xFF> = 7..262.
Training uses a temporary pre-tokenizer, Split on the regex `▁*[^▁\n]+|▁+|\n+` (a word keeps the "▁"s in front
of it, as SentencePiece's split_by_whitespace does), only so that no merge spans two words; every learned token
then has the shape ▁*[^▁\n]* or \n+, so no merge can apply across such a boundary and BPE on the raw,
un-pre-tokenized string gives the same ids. The script checks that equivalence on all the text it uses.

Training is in float32 on the CPU; weights are rounded to bfloat16 (round-to-nearest-even) only when saved, and
all perplexities are measured by loading the saved folders back with transformers
(AutoModelForCausalLM, attn_implementation="eager"), prepending <bos> to every scored window.

Run:
    pip install torch transformers tokenizers safetensors
    python tools/make_demo.py --out fixtures/demo            # ~10-15 min on 2 busy CPU cores

Deterministic from --seed (default 0) for a given machine, thread count (--threads, default 1), Python version
(the pydoc text ships with Python) and package versions: seeds for random/numpy/torch are set and
torch.use_deterministic_algorithms(True) is on.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time

import numpy as np

PRETRAIN_HELDOUT_TOPICS = ["assert", "del", "global", "nonlocal", "pass", "raise", "truth"]
LICENSE_DIR = "/usr/share/common-licenses"
TARGET_TRAIN_FILES = ["GPL-1", "GPL-2", "GPL-3", "LGPL-2.1", "GFDL-1.3"]
TARGET_HELDOUT_FILE = "LGPL-3"

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
PAD, EOS, BOS, UNK = 0, 1, 2, 3

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="fixtures/demo", help="output folder (its generated files are replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it slightly)")
    p.add_argument("--vocab-size", type=int, default=1024)
    # model
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--sliding-window", type=int, default=32)
    p.add_argument("--max-positions", type=int, default=512)
    # pre-training ("sft")
    p.add_argument("--context", type=int, default=128, help="tokens per training window, <bos> included")
    p.add_argument("--pt-steps", type=int, default=600)
    p.add_argument("--pt-batch", type=int, default=16)
    p.add_argument("--pt-lr", type=float, default=3e-3)
    p.add_argument("--pt-min-lr", type=float, default=3e-4)
    p.add_argument("--pt-warmup", type=int, default=100)
    p.add_argument("--pt-weight-decay", type=float, default=0.1)
    # fine-tuning runs
    p.add_argument("--ft-steps", type=int, nargs="+", default=[100, 200, 300], help="checkpoint steps (last = total)")
    p.add_argument("--ft-batch", type=int, default=16)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-warmup", type=int, default=20)
    p.add_argument("--ft-weight-decay", type=float, default=0.0)
    p.add_argument("--ft-subset", type=float, default=1.0,
                   help="fraction of the target paragraphs each run trains on, drawn with the run's seed "
                        "(default 1.0: both runs see all of it; e.g. 0.5 makes the runs more diverse)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args()


# ----------------------------------------------------------------------------------------------- texts

def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_texts():
    import pydoc_data.topics as topics_mod

    topics = topics_mod.topics
    missing = [k for k in PRETRAIN_HELDOUT_TOPICS if k not in topics]
    if missing:
        sys.exit(f"pydoc_data.topics lacks {missing}")
    pretrain_docs = [topics[k] for k in sorted(topics) if k not in PRETRAIN_HELDOUT_TOPICS]
    heldout_pretrain = "\n\n".join(topics[k].strip("\n") for k in PRETRAIN_HELDOUT_TOPICS) + "\n"
    target_docs = []
    for name in TARGET_TRAIN_FILES:
        with open(os.path.join(LICENSE_DIR, name), encoding="utf-8") as f:
            target_docs.append(f.read())
    with open(os.path.join(LICENSE_DIR, TARGET_HELDOUT_FILE), encoding="utf-8") as f:
        heldout_target = f.read()
    sources = {
        "pretrain": {"file": topics_mod.__file__, "sha256": sha256_file(topics_mod.__file__),
                     "python": platform.python_version(), "topics": len(pretrain_docs),
                     "chars": sum(len(d) for d in pretrain_docs)},
        "heldout_pretrain_topics": PRETRAIN_HELDOUT_TOPICS,
        "target": {os.path.join(LICENSE_DIR, n): sha256_file(os.path.join(LICENSE_DIR, n)) for n in TARGET_TRAIN_FILES},
        "heldout_target": {os.path.join(LICENSE_DIR, TARGET_HELDOUT_FILE):
                           sha256_file(os.path.join(LICENSE_DIR, TARGET_HELDOUT_FILE))},
    }
    return pretrain_docs, target_docs, heldout_pretrain, heldout_target, sources


# ------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs, vocab_size, out_dir):
    """Trains the Gemma-style BPE and writes tokenizer.json / tokenizer_config.json / special_tokens_map.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Training-only pre-tokenizer: keeps merges inside words (see the module docstring); removed before saving.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁\n]+|▁+|\n+"), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + BYTE_TOKENS,
                                  limit_alphabet=110, min_frequency=2, show_progress=False)
    tok.train_from_iterator(docs, trainer)

    j = json.loads(tok.to_str())
    # Byte tokens are ordinary vocabulary entries (as in Gemma), not added/special tokens.
    j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] in SPECIALS]
    j["pre_tokenizer"] = None
    j["truncation"] = None
    j["padding"] = None
    final = Tokenizer.from_str(json.dumps(j))
    final.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    final.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", BOS)])
    vocab = final.get_vocab()
    for i, s in enumerate(SPECIALS + BYTE_TOKENS):
        assert vocab[s] == i, (s, vocab.get(s), i)
    assert final.get_vocab_size() == vocab_size, final.get_vocab_size()
    # The saved tokenizer (no pre-tokenizer) must tokenize exactly as the trained one.
    for d in docs:
        assert tok.encode(d, add_special_tokens=False).ids == final.encode(d, add_special_tokens=False).ids
    os.makedirs(out_dir, exist_ok=True)
    final.save(os.path.join(out_dir, "tokenizer.json"))

    tcfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in enumerate(SPECIALS)
        },
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "chat_template": GEMMA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    stm = {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], "bos_token": "<bos>",
           "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(stm, f, indent=2)
        f.write("\n")
    return final


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# ----------------------------------------------------------------------------------------------- model

def published_config(args, transformers_version):
    """config.json in the form Google published for Gemma 2 (older keys, no layer_types / rope_parameters)."""
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "cache_implementation": "hybrid",
        "head_dim": args.head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": args.hidden,
        "initializer_range": 0.02,
        "intermediate_size": args.intermediate,
        "max_position_embeddings": args.max_positions,
        "num_attention_heads": args.heads,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "query_pre_attn_scalar": args.head_dim,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": args.sliding_window,
        "torch_dtype": "bfloat16",
        "transformers_version": transformers_version,
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


def make_model(args):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, query_pre_attn_scalar=args.head_dim, sliding_window=args.sliding_window,
        max_position_embeddings=args.max_positions, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        rope_theta=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attention_dropout=0.0,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg).to(torch.float32)
    model.config._attn_implementation = "eager"
    return model


def save_model(model, args, out_dir, tok_dir, transformers_version):
    """Writes the published layout: bf16 model.safetensors (no lm_head), config.json, tokenizer files."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = model.state_dict()
    tensors = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight
        tensors[name] = t.detach().to(torch.bfloat16).contiguous().clone()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(published_config(args, transformers_version), f, indent=2)
        f.write("\n")
    for fn in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(tok_dir, fn), os.path.join(out_dir, fn))


def load_saved(path, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


# -------------------------------------------------------------------------------------------- training

def windows_for_eval(ids, context):
    """Non-overlapping windows of context-1 text tokens, each with <bos> prepended."""
    n = context - 1
    return [[BOS] + ids[i:i + n] for i in range(0, len(ids), n)]


def perplexity(model, ids, context):
    """exp(mean NLL) over every text token of `ids`, scored in windows with <bos> prepended."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows_for_eval(ids, context):
            x = torch.tensor([w])
            logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            total += nll.item()
            count += len(w) - 1
    return math.exp(total / count)


def sample_batch(rng, stream, batch, context):
    import torch

    n = context - 1
    starts = rng.integers(0, len(stream) - n, size=batch)
    rows = [np.concatenate([[BOS], stream[s:s + n]]) for s in starts]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def lm_loss(model, x):
    import torch.nn.functional as F

    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def make_optimizer(model, lr, weight_decay):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train(model, stream, steps, batch, context, lr_at, weight_decay, grad_clip, seed, log, name,
          log_every, on_step=None):
    import torch

    rng = np.random.default_rng(seed)
    opt = make_optimizer(model, lr_at(0), weight_decay)
    model.train()
    t0 = time.time()
    recent, last_mean = [], float("nan")
    for step in range(1, steps + 1):
        lr = lr_at(step - 1)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(rng, stream, batch, context)
        loss = lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        recent.append(loss.item())
        if step % log_every == 0 or step == steps:
            last_mean = float(np.mean(recent))
            log(f"  {name} step {step:5d}  lr {lr:.2e}  loss {last_mean:.4f}  ({time.time() - t0:.0f}s)")
            recent = []
        if on_step is not None:
            on_step(step)
    model.eval()
    return last_mean  # mean training loss over the last logging interval


# ------------------------------------------------------------------------------------------------ main

def main():
    args = parse_args()
    t_start = time.time()
    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    import safetensors
    import tokenizers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    out = args.out
    os.makedirs(out, exist_ok=True)
    for old in ["sft", "run_a", "run_b", ".tokenizer", "heldout-pretrain.txt", "heldout-target.txt",
                "training-log.txt"]:  # what this script writes; anything else (README.md) is kept
        path = os.path.join(out, old)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    log_lines = []

    def log(s=""):
        print(s, flush=True)
        log_lines.append(s)

    log("gemma-merge demo family: tools/make_demo.py")
    log(f"command: python tools/make_demo.py {' '.join(sys.argv[1:])}".rstrip())
    log(f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, tokenizers {tokenizers.__version__}, safetensors {safetensors.__version__}, "
        f"numpy {np.__version__}; threads {args.threads}; seed {args.seed}")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    log("settings: " + json.dumps(settings))

    pretrain_docs, target_docs, heldout_pretrain, heldout_target, sources = load_texts()
    log("sources: " + json.dumps(sources))
    with open(os.path.join(out, "heldout-pretrain.txt"), "w", encoding="utf-8") as f:
        f.write(heldout_pretrain)
    with open(os.path.join(out, "heldout-target.txt"), "w", encoding="utf-8") as f:
        f.write(heldout_target)

    # Tokenizer: trained on the training text of both distributions (never on the held-out texts).
    tok_dir = os.path.join(out, ".tokenizer")
    tok = train_tokenizer(pretrain_docs + target_docs, args.vocab_size, tok_dir)

    def encode_stream(docs):
        ids = []
        for i, d in enumerate(docs):
            if i:
                ids += tok.encode("\n\n", add_special_tokens=False).ids
            ids += tok.encode(d, add_special_tokens=False).ids
        return np.array(ids, dtype=np.int64)

    pt_stream = encode_stream(pretrain_docs)
    ft_stream = encode_stream(target_docs)
    ho_pt = tok.encode(heldout_pretrain, add_special_tokens=False).ids
    ho_tg = tok.encode(heldout_target, add_special_tokens=False).ids
    log(f"tokens: pretrain {len(pt_stream)} ({sum(map(len, pretrain_docs)) / len(pt_stream):.2f} chars/token), "
        f"target {len(ft_stream)} ({sum(map(len, target_docs)) / len(ft_stream):.2f} chars/token), "
        f"heldout-pretrain {len(ho_pt)}, heldout-target {len(ho_tg)}")

    # ---- pre-training: the "sft" model
    model = make_model(args)
    n_params = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    log(f"model: Gemma2ForCausalLM, {n_params} parameters (tied embeddings), layer types "
        f"{model.config.layer_types}")

    def pt_lr(i):
        if i < args.pt_warmup:
            return args.pt_lr * (i + 1) / args.pt_warmup
        p = (i - args.pt_warmup) / max(1, args.pt_steps - args.pt_warmup)
        return args.pt_min_lr + 0.5 * (args.pt_lr - args.pt_min_lr) * (1 + math.cos(math.pi * p))

    def pt_eval(step):
        if step % 200 == 0 or step == args.pt_steps:
            log(f"    (f32 weights) held-out ppl at step {step}: pretrain "
                f"{perplexity(model, ho_pt, args.context):.2f}, target {perplexity(model, ho_tg, args.context):.2f}")
            model.train()

    log(f"pre-training: {args.pt_steps} steps x {args.pt_batch} windows x {args.context} tokens")
    pt_final = train(model, pt_stream, args.pt_steps, args.pt_batch, args.context, pt_lr, args.pt_weight_decay,
                     args.grad_clip, args.seed, log, "sft", args.log_every, on_step=pt_eval)
    sft_dir = os.path.join(out, "sft")
    save_model(model, args, sft_dir, tok_dir, transformers.__version__)
    sft_state = {k: v.clone() for k, v in model.state_dict().items()}

    # ---- fine-tuning runs (WARP's RL runs, in miniature): same init, different seeds / data order
    ft_total = args.ft_steps[-1]

    def ft_lr(i):
        return args.ft_lr * min(1.0, (i + 1) / args.ft_warmup)

    final_losses = {"sft": pt_final}
    runs = {"run_a": args.seed + 1, "run_b": args.seed + 2}
    for run, run_seed in runs.items():
        torch.manual_seed(run_seed)
        model.load_state_dict(sft_state)
        run_stream = ft_stream
        if args.ft_subset < 1.0:
            sub_rng = np.random.default_rng(1000 + run_seed)
            paras = [p for d in target_docs for p in d.split("\n\n") if p.strip()]
            kept = [p for p in paras if sub_rng.random() < args.ft_subset]
            run_stream = encode_stream(kept)
            log(f"{run}: trains on {len(kept)} of {len(paras)} target paragraphs ({len(run_stream)} tokens)")

        def save_ckpt(step, run=run):
            if step in args.ft_steps:
                save_model(model, args, os.path.join(out, run, f"step-{step}"), tok_dir, transformers.__version__)

        log(f"fine-tuning {run} (seed {run_seed}): {ft_total} steps x {args.ft_batch} windows, "
            f"checkpoints at {args.ft_steps}")
        final_losses[run] = train(model, run_stream, ft_total, args.ft_batch, args.context, ft_lr,
                                  args.ft_weight_decay, args.grad_clip, run_seed, log, run, args.log_every,
                                  on_step=save_ckpt)
    shutil.rmtree(tok_dir)

    # ---- evaluation of the saved bf16 folders, loaded back with transformers
    log("")
    log("held-out perplexity of the saved bfloat16 checkpoints (transformers AutoModelForCausalLM, eager")
    log(f"attention, f32 compute on the bf16 weights; <bos> + {args.context - 1}-token windows):")
    log(f"{'model':<18}{'heldout-pretrain':>18}{'heldout-target':>16}")
    folders = ["sft"] + [f"{r}/step-{s}" for r in runs for s in args.ft_steps]
    results = {}
    for folder in folders:
        m = load_saved(os.path.join(out, folder), torch.float32)
        if folder == "sft":
            assert m.config.layer_types == model.config.layer_types, m.config.layer_types
            assert m.config.sliding_window == args.sliding_window
            assert m.config.query_pre_attn_scalar == args.head_dim
            assert m.config._attn_implementation == "eager"
        results[folder] = (perplexity(m, ho_pt, args.context), perplexity(m, ho_tg, args.context))
        log(f"{folder:<18}{results[folder][0]:>18.2f}{results[folder][1]:>16.2f}")
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(sft_dir)
    assert len(hf_tok) == args.vocab_size, (len(hf_tok), args.vocab_size)
    for text, ids in [(heldout_pretrain, ho_pt), (heldout_target, ho_tg)]:
        assert hf_tok(text)["input_ids"] == [BOS] + ids, "AutoTokenizer disagrees with tokenizers"
    log(f"sanity: AutoTokenizer ({type(hf_tok).__name__}) gives the same ids, with <bos> prepended, "
        f"on both held-out texts; len(tokenizer) = {len(hf_tok)}")
    m16 = load_saved(sft_dir, torch.bfloat16)
    log(f"sanity: sft computed entirely in bf16: pretrain {perplexity(m16, ho_pt, args.context):.2f}, "
        f"target {perplexity(m16, ho_tg, args.context):.2f}")
    log(f"final training losses (mean of the last {args.log_every} steps): "
        + ", ".join(f"{k} {v:.4f}" for k, v in final_losses.items()))
    last = f"step-{ft_total}"
    log(f"summary: params {n_params}; sft ppl pretrain/target {results['sft'][0]:.2f}/{results['sft'][1]:.2f}; "
        + "; ".join(f"{r}/{last} {results[f'{r}/{last}'][0]:.2f}/{results[f'{r}/{last}'][1]:.2f}" for r in runs))
    log(f"wall time: {time.time() - t_start:.0f}s")
    with open(os.path.join(out, "training-log.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    main()
