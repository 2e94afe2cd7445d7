#!/usr/bin/env python3
"""PyTorch peer of `attention-bench time` / `memory`: causal GQA attention forward + backward
with `torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`, bf16,
on CUDA, at the shapes the Rust benchmark uses. One JSON line per result on stdout.

- time: b4×32 heads×2048×d64 and b2×32×2048×d128 (8 KV heads); median of 10 after 3 warm-up,
  each iteration `o = sdpa(q, k, v)`, `o.backward(cot)`, then `torch.cuda.synchronize()`;
  also in the model's layout (`torch_sdpa_model_layout`: q, k, v `[b, s, heads, d]` seen as
  `[b, heads, s, d]`, the output made `[b, s, heads·d]` for `o_proj` as transformers' Llama
  attention does, its gradient arriving in that layout: the layout `attention-bench` times), and
  an eager (materialised) reference, `softmax(q·kᵀ/√d + causal)·v` with K/V repeated.
- memory: b1, 32 heads, 8 KV heads, d128, s 2k, 8k, 32k: `torch.cuda.max_memory_allocated`
  over one forward + backward, minus the inputs, plus the inputs' own size.

Usage: python3 attention_peer.py [--skip-eager]
"""

import json
import sys
import time

import torch
import torch.nn.functional as F


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def eager(q, k, v):
    b, h, s, d = q.shape
    g = h // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return probs @ v


def model_layout(q, k, v):
    """SDPA as a Llama layer calls it: projections' `[b, s, heads, d]` seen as `[b, heads, s, d]`,
    the output made `[b, s, heads·d]` (transformers' `transpose(1, 2).contiguous()`)."""
    b, s, h, d = q.shape
    o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).contiguous().reshape(b, s, h * d)


def inputs(b, h, kvh, s, d):
    dev = "cuda"
    mk = lambda *shape: torch.randn(*shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
    return mk(b, h, s, d), mk(b, kvh, s, d), mk(b, kvh, s, d), torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)


def fwd_bwd(fn, q, k, v, cot):
    q.grad = k.grad = v.grad = None
    o = fn(q, k, v)
    o.backward(cot)
    torch.cuda.synchronize()


def median_ms(f):
    for _ in range(3):
        f()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def backend_name():
    # Which SDPA kernel PyTorch picks (flash / efficient / cudnn / math) is not reported by the
    # public API; record the enabled set.
    b = torch.backends.cuda
    return {
        "flash": b.flash_sdp_enabled(),
        "mem_efficient": b.mem_efficient_sdp_enabled(),
        "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: None)(),
        "math": b.math_sdp_enabled(),
    }


def main():
    skip_eager = "--skip-eager" in sys.argv
    torch.manual_seed(0)
    print(json.dumps({"peer": "torch", "version": torch.__version__, "device": torch.cuda.get_device_name(), "sdp": backend_name()}))
    for b, h, kvh, s, d in [(4, 32, 8, 2048, 64), (2, 32, 8, 2048, 128)]:
        q, k, v, cot = inputs(b, h, kvh, s, d)
        flops = 7.0 * 2.0 * b * h * s * s * d / 2.0
        impls = [("torch_sdpa", sdpa)] + ([] if skip_eager else [("torch_eager", eager)])
        for name, fn in impls:
            ms = median_ms(lambda: fwd_bwd(fn, q, k, v, cot))
            print(json.dumps({"bench": "attention_fwd_bwd", "impl": name, "dtype": "bf16", "b": b, "heads": h, "kv_heads": kvh, "seq": s, "head_dim": d, "ms": round(ms, 3), "causal_tflops": round(flops / ms / 1e9, 1)}))
        token_major = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
        cot_model = cot.transpose(1, 2).reshape(b, s, h * d).contiguous()
        for name, fn in [("torch_sdpa_model_layout", model_layout)]:
            ms = median_ms(lambda: fwd_bwd(fn, *token_major, cot_model))
            print(json.dumps({"bench": "attention_fwd_bwd", "impl": name, "dtype": "bf16", "b": b, "heads": h, "kv_heads": kvh, "seq": s, "head_dim": d, "ms": round(ms, 3), "causal_tflops": round(flops / ms / 1e9, 1)}))
        del q, k, v, cot
    b, h, kvh, d = 1, 32, 8, 128
    for s in [2048, 8192, 32768]:
        torch.cuda.empty_cache()
        q, k, v, cot = inputs(b, h, kvh, s, d)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(sdpa, q, k, v, cot)
        peak = torch.cuda.max_memory_allocated()
        inputs_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, cot))
        mib = lambda x: round(x / 2**20, 1)
        print(json.dumps({"bench": "attention_memory", "impl": "torch_sdpa", "dtype": "bf16", "b": b, "heads": h, "kv_heads": kvh, "seq": s, "head_dim": d, "inputs_mib": mib(inputs_bytes), "peak_over_inputs_mib": mib(peak - base), "max_memory_allocated_mib": mib(peak)}))
        del q, k, v, cot


if __name__ == "__main__":
    main()
