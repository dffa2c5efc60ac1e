#!/usr/bin/env python3
"""Reference implementation of gemma-merge's recipe semantics, in float64 NumPy.

A slow, obviously-correct cross-check for the Rust merge engine: it reads a recipe YAML (the format of
shared/spec/recipe.md), evaluates its steps (`ema` with or without `steps` / `start`, `slerp` with
`angle: layer | tensor` and the M >= 2 chain, `liti` with one η or a list, `linear`) on whole models held in
memory as float64, and writes the output step as a safetensors file, rounded once (round-to-nearest-even,
directly from f64) to float32 by default, which is how shared/golden/merge-case/expected/*.safetensors hold it:
the golden files store the merge's f32 values *before* the final rounding to the recipe's `dtype` (checked:
warp.yaml says bfloat16 and linear.yaml float16, yet their expected tensors are not representable in those
types, and they match this script's f32 values exactly). With `--dtype recipe` the values are rounded to the
recipe's dtype instead and stored in it, i.e. what `gemma-merge run` itself writes (it computes in f32, so a
value lying within ~1e-7 relative of a rounding tie could in rare cases round the other way).

Usage:
    python tools/reference_merge.py RECIPE.yaml --out OUT.safetensors            # one η (or no liti)
    python tools/reference_merge.py RECIPE.yaml --out OUTDIR                     # η list: OUTDIR/eta-<η>.safetensors
    python tools/reference_merge.py RECIPE.yaml --check EXPECTED[.safetensors|DIR] [--tol 1e-6]
    options: --dtype float32|recipe (rounding and stored dtype; default float32), --step NAME (another step)

Check against the golden case (all must print OK, max abs diff 0 here):
    for r in warp linear slerp-tensor; do python tools/reference_merge.py \
        ../shared/golden/merge-case/recipes/$r.yaml --check ../shared/golden/merge-case/expected/$r.safetensors; done
    python tools/reference_merge.py ../shared/golden/merge-case/recipes/front.yaml \
        --check ../shared/golden/merge-case/expected/front

Paths in the recipe are relative to the recipe file's folder. Only numpy and PyYAML are needed (the
safetensors format is read and written here directly, bf16 included).

Not implemented (they don't change tensor values): shard_size, save:, the output folder layout (config,
tokenizer, manifest, model card), and most of the recipe validation the Rust tool must do.
"""

import argparse
import json
import math
import os
import re
import struct
import sys

import numpy as np
import yaml

# ------------------------------------------------------------------------------------------ safetensors

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "U16": np.uint16, "U32": np.uint32,
       "U64": np.uint64}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def read_safetensors(path):
    """Returns ({name: (dtype_string, np.ndarray)}, [names in header order]); floats exactly as stored
    (BF16 is returned widened to float32, exactly)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out, order = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        raw = data[base + a:base + b]
        if dt == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_NP[dt]).newbyteorder("<"))
        out[name] = (dt, arr.reshape(shape).copy())
        order.append(name)
    return out, order


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, dtype_string, np.ndarray already in that dtype; BF16 given as uint16 bits)."""
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dt, arr in tensors:
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_model(path):
    """A model folder (model.safetensors, an index and its shards, or several *.safetensors) or one file.
    Returns (tensors {name: (dtype, array)}, order)."""
    if os.path.isfile(path):
        return read_safetensors(path)
    if not os.path.isdir(path):
        sys.exit(f"no model at {path}")
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
        if not files:
            sys.exit(f"no safetensors in {path}")
    tensors, order = {}, []
    for fn in files:
        t, o = read_safetensors(os.path.join(path, fn))
        tensors.update(t)
        order += o
    return tensors, order


# ---------------------------------------------------------------------------------------------- rounding

def round_to(x, dtype):
    """Rounds float64 values once, to nearest-even, to `dtype`; returns float64 holding the rounded values."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x.copy()
    if dtype == "float32":
        return x.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        # bf16: 8 exponent bits (as f32), 8 significant bits; subnormal spacing 2^-133.
        _, e = np.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
        ulp = np.ldexp(1.0, np.maximum(e.astype(np.int64) - 8, -133))
        r = np.round(x / ulp) * ulp  # x / ulp is exact; np.round is round-half-to-even
        r = np.where(np.abs(r) >= 2.0 ** 128, np.copysign(np.inf, x), r)  # overflow
        return np.where(np.isfinite(x), r, x)
    raise ValueError(dtype)


def encode(values, dtype):
    """float64 values already rounded to `dtype` -> (safetensors dtype string, array to store)."""
    if dtype == "float32":
        return "F32", values.astype(np.float32)
    if dtype == "float16":
        return "F16", values.astype(np.float16)
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32)
        assert not np.any(bits & 0xFFFF), "value not representable in bf16"
        return "BF16", (bits >> 16).astype(np.uint16)
    raise ValueError(dtype)


ST_TO_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}

# ----------------------------------------------------------------------------------------------- recipe

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class Recipe:
    def __init__(self, path):
        self.path = path
        self.dir = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            self.r = yaml.safe_load(f)
        self.aliases = self.r.get("models") or {}
        self.steps = self.r["steps"]
        self.step_index = {s["name"]: i for i, s in enumerate(self.steps)}
        self.cache = {}        # path -> tensors
        self.results = {}      # step name -> {tensor: float64 array} (or {eta: {...}} for an η list)
        base_ref = self.r["base"]
        self.base_tensors, self.base_order = self.model_tensors(base_ref, before=len(self.steps))
        floats = [dt for dt, _ in self.base_tensors.values() if dt in FLOAT_DTYPES]
        self.dtype = self.r.get("dtype") or ST_TO_NAME[floats[0]]
        self.float_names = [n for n in self.base_order if self.base_tensors[n][0] in FLOAT_DTYPES]

    def resolve_path(self, p):
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.dir, p))

    def model_tensors(self, ref, before):
        """(tensors, order) of a model reference that is not a step: an alias or a path."""
        if ref in self.aliases:
            ref = self.aliases[ref]
        path = self.resolve_path(ref)
        if path not in self.cache:
            self.cache[path] = load_model(path)
        return self.cache[path]

    def get(self, ref, before):
        """float64 tensors {name: array} of a reference (a step above index `before`, an alias, or a path)."""
        if ref in self.step_index:
            if self.step_index[ref] >= before:
                sys.exit(f"step {ref!r} used before it is defined")
            res = self.results[ref]
            if isinstance(res, list):
                sys.exit(f"step {ref!r} has an η list; only the output step may")
            return res
        tensors, _ = self.model_tensors(ref, before)
        out = {}
        for n in self.float_names:
            if n not in tensors:
                sys.exit(f"tensor {n} missing from {ref}")
            dt, arr = tensors[n]
            if arr.shape != self.base_tensors[n][1].shape:
                sys.exit(f"tensor {n} of {ref}: shape {arr.shape} != base {self.base_tensors[n][1].shape}")
            out[n] = arr.astype(np.float64)
        return out

    # -------------------------------------------------------------------------------------- methods
    def ema(self, s, i):
        mu = float(s["decay"])
        models = s["models"]
        n = len(models)
        steps = s.get("steps")
        start = s.get("start")
        if steps is None:
            deltas = [1] * n
        else:
            prev = [0] + list(steps[:-1])
            deltas = [b - a for a, b in zip(prev, steps)]
        a = [(1.0 - mu) ** d for d in deltas]  # per-checkpoint retention of the running average

        def tail(k):  # prod_{j>k} a_j  (0-based)
            p = 1.0
            for j in range(k + 1, n):
                p *= a[j]
            return p

        terms = []
        if start is not None:
            terms.append((start, tail(-1)))
            terms += [(models[k], (1.0 - a[k]) * tail(k)) for k in range(n)]
        else:
            terms.append((models[0], tail(0)))
            terms += [(models[k], (1.0 - a[k]) * tail(k)) for k in range(1, n)]
        return self.weighted(terms, i)

    def weighted(self, terms, i):
        out = None
        for ref, w in terms:
            t = self.get(ref, i)
            if out is None:
                out = {n: w * t[n] for n in self.float_names}
            else:
                for n in self.float_names:
                    out[n] = out[n] + w * t[n]
        return out

    def linear(self, s, i):
        ws = [float(w) for w in s["weights"]]
        if s.get("normalize", True):
            tot = sum(ws)
            if tot == 0:
                sys.exit("linear: weights sum to 0")
            ws = [w / tot for w in ws]
        return self.weighted(list(zip(s["models"], ws)), i)

    def groups(self, angle):
        g = {}
        for n in self.float_names:
            m = LAYER_RE.match(n)
            key = ("layer", int(m.group(1))) if (angle == "layer" and m) else ("tensor", n)
            g.setdefault(key, []).append(n)
        return list(g.values())

    def slerp(self, s, i):
        models = s["models"]
        base = self.get(s.get("base", self.r["base"]), i)
        angle = s.get("angle", "layer")
        if "t" in s and "weights" in s:
            sys.exit("slerp: t and weights together")
        if "t" in s:
            if len(models) != 2:
                sys.exit("slerp: t needs exactly two models")
            lambdas = [None, float(s["t"])]
        else:
            ws = [float(w) for w in s.get("weights", [1.0] * len(models))]
            lambdas = [None] + [ws[m] / sum(ws[:m + 1]) for m in range(1, len(models))]
        deltas = []
        for ref in models:
            t = self.get(ref, i)
            deltas.append({n: t[n] - base[n] for n in self.float_names})
        r = deltas[0]
        groups = self.groups(angle)
        for m in range(1, len(models)):
            lam, b = lambdas[m], deltas[m]
            new = {}
            for grp in groups:
                dot = sum(float(np.dot(r[n].ravel(), b[n].ravel())) for n in grp)
                na = math.sqrt(sum(float(np.dot(r[n].ravel(), r[n].ravel())) for n in grp))
                nb = math.sqrt(sum(float(np.dot(b[n].ravel(), b[n].ravel())) for n in grp))
                if na == 0.0 or nb == 0.0:
                    ca, cb = 1.0 - lam, lam
                else:
                    cos = max(-1.0, min(1.0, dot / (na * nb)))
                    omega = math.acos(cos)
                    so = math.sin(omega)
                    if so < 1e-6:
                        ca, cb = 1.0 - lam, lam
                    else:
                        ca, cb = math.sin((1.0 - lam) * omega) / so, math.sin(lam * omega) / so
                for n in grp:
                    new[n] = ca * r[n] + cb * b[n]
            r = new
        return {n: base[n] + r[n] for n in self.float_names}

    def liti(self, s, i):
        base = self.get(s.get("base", self.r["base"]), i)
        model = self.get(s["model"], i)
        etas = s["eta"] if isinstance(s["eta"], list) else [s["eta"]]
        res = [(float(eta), {n: (1.0 - eta) * base[n] + eta * model[n] for n in self.float_names}) for eta in etas]
        return res if isinstance(s["eta"], list) else res[0][1]

    def run(self):
        for i, s in enumerate(self.steps):
            method = s["method"]
            if "save" in s:
                print(f"note: step {s['name']!r} has save: {s['save']} (not written by the reference)")
            self.results[s["name"]] = getattr(self, method)(s, i)

    def output_tensors(self, values, store):
        """Rounds once to float32 or the recipe dtype; returns the (name, dtype, array) list in the base's order."""
        out = []
        for n in self.base_order:
            dt, arr = self.base_tensors[n]
            if dt not in FLOAT_DTYPES:
                out.append((n, dt, arr))  # non-floating tensors: copied from the base
                continue
            dtype = "float32" if store == "float32" else self.dtype
            out.append((n,) + encode(round_to(values[n], dtype), dtype))
        return out


def eta_name(eta):
    s = repr(float(eta))  # Python's repr, like Rust's {:?}: shortest round-trip, at least one decimal
    return f"eta-{s}"


def compare(path_a, path_b):
    a, _ = read_safetensors(path_a)
    b, _ = read_safetensors(path_b)
    if set(a) != set(b):
        return math.inf, f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    worst, where = 0.0, ""
    for n in a:
        x, y = a[n][1].astype(np.float64), b[n][1].astype(np.float64)
        if x.shape != y.shape:
            return math.inf, f"{n}: shape {x.shape} vs {y.shape}"
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        if d > worst:
            worst, where = d, n
    return worst, where


def main():
    p = argparse.ArgumentParser(description="float64 reference for gemma-merge recipes")
    p.add_argument("recipe")
    p.add_argument("--out", help="output .safetensors file (or a folder for an η list)")
    p.add_argument("--check", help="expected .safetensors (or folder of eta-*.safetensors) to compare with")
    p.add_argument("--tol", type=float, default=1e-6, help="max abs difference accepted by --check")
    p.add_argument("--dtype", choices=["float32", "recipe"], default="float32",
                   help="round to and store as float32 (like the golden expected files) or the recipe's dtype")
    p.add_argument("--step", help="write this step instead of the recipe's output step")
    a = p.parse_args()
    if not a.out and not a.check:
        p.error("give --out and/or --check")

    rec = Recipe(a.recipe)
    rec.run()
    name = a.step or rec.r.get("output_step") or rec.steps[-1]["name"]
    res = rec.results[name]
    outputs = [(eta_name(eta) + ".safetensors", vals) for eta, vals in res] if isinstance(res, list) \
        else [(None, res)]

    tmpdir = None
    if a.out:
        target = a.out
    else:
        import tempfile
        tmpdir = tempfile.mkdtemp()
        target = os.path.join(tmpdir, "out" if isinstance(res, list) else "out.safetensors")
    written = []
    for fn, vals in outputs:
        path = target if fn is None else os.path.join(target, fn)
        if fn is not None:
            os.makedirs(target, exist_ok=True)
        write_safetensors(path, rec.output_tensors(vals, a.dtype), metadata={"format": "pt"})
        written.append((fn, path))
        if a.out:
            print(f"wrote {path} ({'float32' if a.dtype == 'float32' else rec.dtype})")
    ok = True
    if a.check:
        for fn, path in written:
            exp = a.check if fn is None else os.path.join(a.check, fn)
            worst, where = compare(path, exp)
            good = worst <= a.tol
            ok &= good
            print(f"{'OK  ' if good else 'FAIL'} {os.path.basename(exp)}: max abs diff {worst:.3g} {where}")
    if tmpdir:
        import shutil
        shutil.rmtree(tmpdir)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
