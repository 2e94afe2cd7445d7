#!/usr/bin/env python3
"""Independent check of tests/fixtures with numpy only (no torch/transformers/peft).

Re-implements the documented semantics (Llama/Qwen2 forward, llama3 rope scaling, GQA, LoRA /
rsLoRA / rank_pattern / alpha_pattern / modules_to_save, causal-LM loss) in float64 numpy and
compares against every reference.safetensors; spot-checks the stored gradients by central finite
differences. Doubles as a readable spec of what the Rust side must compute.

    pip install numpy safetensors
    python3 tests/scripts/check_fixtures.py [tests/fixtures]
"""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

FX = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "fixtures")


def load_weights(d: Path) -> dict:
    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    w = {}
    for f in files:
        w.update(load_file(str(d / f)))
    return {k: v.astype(np.float64) for k, v in w.items()}


def load_bf16_weights(d: Path) -> dict:
    """numpy has no bf16: read raw bytes from the safetensors header and upcast by bit shifting."""
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(idx.values())):
        raw = (d / f).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        for k, meta in header.items():
            if k == "__metadata__":
                continue
            assert meta["dtype"] == "BF16", meta
            s, e = meta["data_offsets"]
            u16 = np.frombuffer(raw[8 + n + s : 8 + n + e], dtype="<u2")
            out[k] = (u16.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"]).astype(np.float64)
    return out


def rope_inv_freq(cfg: dict) -> np.ndarray:
    if "rope_parameters" in cfg:
        rp = dict(cfg["rope_parameters"])
    else:  # transformers 4 form
        rp = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
        rp["rope_theta"] = cfg["rope_theta"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / (rp["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    t = rp.get("rope_type", rp.get("type"))
    if t == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    else:
        assert t == "default", t
    return inv


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rot_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


class Lora:
    def __init__(self, adir: Path, n_layers: int):
        self.cfg = json.loads((adir / "adapter_config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(adir / "adapter_model.safetensors")).items()}

    def scale(self, module: str) -> float:
        c = self.cfg
        r, a = c["r"], c["lora_alpha"]
        for pat, v in c.get("rank_pattern", {}).items():
            if re.match(rf"(.*\.)?({pat})$", module):
                r = v
        for pat, v in c.get("alpha_pattern", {}).items():
            if re.match(rf"(.*\.)?({pat})$", module):
                a = v
        return a / math.sqrt(r) if c.get("use_rslora") else a / r

    def delta(self, module: str, x):
        ka = f"base_model.model.{module}.lora_A.weight"
        if ka not in self.w:
            return 0.0
        A, B = self.w[ka], self.w[f"base_model.model.{module}.lora_B.weight"]
        assert A.shape[0] == B.shape[1]
        return self.scale(module) * (x @ A.T) @ B.T


def forward(cfg, W, ids, lora=None, mts=None):
    """Returns logits [B, T, V] (float64)."""
    eps, H, KV = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    W = dict(W)
    if mts:
        W.update(mts)
    hid = {}

    def lin(name, x):
        y = x @ W[name + ".weight"].T
        if name + ".bias" in W:
            y = y + W[name + ".bias"]
        if lora is not None:
            y = y + lora.delta(name, x)
        return y

    x = W["model.embed_tokens.weight"][ids]
    hid["hidden.0"] = x
    B, T, _ = x.shape
    inv = rope_inv_freq(cfg)
    fr = np.arange(T)[:, None] * inv[None, :]
    emb = np.concatenate([fr, fr], -1)
    cos, sin = np.cos(emb)[None, :, None, :], np.sin(emb)[None, :, None, :]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = rms(x, W[f"{p}.input_layernorm.weight"], eps)
        q = lin(f"{p}.self_attn.q_proj", h).reshape(B, T, H, D)
        k = lin(f"{p}.self_attn.k_proj", h).reshape(B, T, KV, D)
        v = lin(f"{p}.self_attn.v_proj", h).reshape(B, T, KV, D)
        q, k = q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin
        rep = H // KV
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # head h uses kv head h // rep
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", s, v).reshape(B, T, H * D)
        x = x + lin(f"{p}.self_attn.o_proj", o)
        h = rms(x, W[f"{p}.post_attention_layernorm.weight"], eps)
        g = lin(f"{p}.mlp.gate_proj", h)
        x = x + lin(f"{p}.mlp.down_proj", g / (1 + np.exp(-g)) * lin(f"{p}.mlp.up_proj", h))
        hid[f"hidden.{i + 1}"] = x
    x = rms(x, W["model.norm.weight"], eps)
    hid["hidden.final_norm"] = x
    head = W.get("lm_head.weight")
    if cfg["tie_word_embeddings"]:
        assert "lm_head.weight" not in W or mts, "tied model should not store lm_head"
        head = W["model.embed_tokens.weight"] if head is None else head
    logits = x @ head.T
    if lora is not None:
        logits = logits + lora.delta("lm_head", x)
    return logits, hid


def loss_of(logits, ids):
    lg = logits[:, :-1]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tgt = np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0]
    return float((lse - tgt).mean())


def close(a, b, what, rtol=1e-5, atol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max()
    ok = np.allclose(a, b, rtol=rtol, atol=atol)
    print(f"  {'ok ' if ok else 'BAD'} {what:40s} max abs err {err:.2e}")
    if not ok:
        raise SystemExit(f"mismatch: {what}")


def main():
    ids = load_file(str(FX / "inputs.safetensors"))["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 12)
    assert json.loads((FX / "inputs.json").read_text())["input_ids"] == ids.tolist()
    rng = np.random.default_rng(0)
    bases = {}
    for name in ["llama-tiny", "llama-tiny-sharded-bf16", "qwen2-tiny", "qwen2-tiny-f16"]:
        d = FX / name
        print(name)
        cfg = json.loads((d / "config.json").read_text())
        W = load_bf16_weights(d) if "bf16" in name else load_weights(d)
        if name.endswith("f16") and "bf16" not in name:
            assert load_file(str(d / "model.safetensors"))["model.norm.weight"].dtype == np.float16
        ref = load_file(str(d / "reference.safetensors"))
        assert all(v.dtype == np.float32 for v in ref.values())
        logits, hid = forward(cfg, W, ids)
        assert ref["logits"].shape == (2, 12, cfg["vocab_size"]) and ref["loss"].shape == (1,)
        close(logits, ref["logits"], "logits")
        close(loss_of(logits, ids), ref["loss"][0], "loss")
        close(loss_of(ref["logits"].astype(np.float64), ids), ref["loss"][0], "loss from ref logits")
        for k in [k for k in ref if k.startswith("hidden.")]:
            close(hid[k], ref[k], k)
        if "rope.inv_freq" in ref:
            close(rope_inv_freq(cfg), ref["rope.inv_freq"], "rope.inv_freq", rtol=1e-6, atol=0)
        v4 = d / "config.v4.json"
        if v4.exists():
            c4 = json.loads(v4.read_text())
            assert "rope_parameters" not in c4 and "rope_theta" in c4
            close(rope_inv_freq(c4), rope_inv_freq(cfg), "config.v4.json rope == config.json rope", 0, 0)
        bases[name] = (cfg, W)

    for name, base in [("llama-tiny-lora", "llama-tiny"), ("llama-tiny-rslora", "llama-tiny"),
                       ("llama-tiny-mts", "llama-tiny"), ("qwen2-tiny-lora", "qwen2-tiny")]:
        d = FX / name
        print(name)
        cfg, W = bases[base]
        lora = Lora(d, cfg["num_hidden_layers"])
        mts = {k[len("base_model.model."):]: v for k, v in lora.w.items() if ".lora_" not in k}
        ref = load_file(str(d / "reference.safetensors"))
        logits, _ = forward(cfg, W, ids, lora, mts)
        close(logits, ref["logits"], "logits")
        close(logits, ref["merged_logits"], "merged_logits", rtol=1e-4, atol=1e-4)
        close(loss_of(logits, ids), ref["loss"][0], "loss")
        gkeys = sorted(k for k in ref if k.startswith("grad."))
        assert [k[5:] for k in gkeys] == sorted(lora.w), "grad keys != adapter keys"
        for k in gkeys:
            assert ref[k].shape == lora.w[k[5:]].shape, k
        # finite-difference spot checks (float64 forward)
        worst = 0.0
        for k in sorted(set(gkeys[:: max(1, len(gkeys) // 6)] + gkeys[-1:] + [g for g in gkeys if ".lora_" not in g])):
            key = k[5:]
            g = ref[k]
            flat = int(np.argmax(np.abs(g))) if rng.random() < 0.5 else int(rng.integers(g.size))
            idx = np.unravel_index(flat, g.shape)
            orig = lora.w[key][idx]
            vals = []
            for sgn in (1, -1):
                lora.w[key][idx] = orig + sgn * 1e-4
                mts2 = {kk[len("base_model.model."):]: v for kk, v in lora.w.items() if ".lora_" not in kk}
                vals.append(loss_of(forward(cfg, W, ids, lora, mts2)[0], ids))
            lora.w[key][idx] = orig
            fd = (vals[0] - vals[1]) / 2e-4
            err = abs(fd - g[idx]) / max(1e-3, abs(g[idx]))
            worst = max(worst, err)
            if err > 1e-3:
                raise SystemExit(f"grad mismatch {k}{idx}: fd {fd} vs ref {g[idx]}")
        print(f"  ok  grads: {len(gkeys)} keys; finite-diff spot checks worst rel err {worst:.1e}")
    print("all fixtures OK")


if __name__ == "__main__":
    main()
