#!/usr/bin/env python3
"""PyTorch peer of `ce-bench`: LM-head logits materialised, then torch eager cross-entropy in f32
(what HF transformers' Llama loss does), forward + backward to the hidden states, bf16 inputs, on
CUDA. Prints one JSON line: median ms of 10 after 3 warm-up (synchronised) and the peak memory of
one call above the inputs (`torch.cuda.max_memory_allocated`).

Usage: python3 ce_peer.py [TOKENS [VOCAB [HIDDEN]]]
"""

import json
import sys
import time

import torch
import torch.nn.functional as F


def main():
    args = [int(a) for a in sys.argv[1:]]
    tokens, vocab, width = (args + [16384, 128256, 4096][len(args):])[:3]
    dev = torch.device("cuda")
    hidden = torch.randn(tokens, width, device=dev, dtype=torch.bfloat16)
    weight = torch.randn(vocab, width, device=dev, dtype=torch.bfloat16) * 0.02
    targets = torch.randint(0, vocab, (tokens,), device=dev)

    def step():
        h = hidden.detach().requires_grad_(True)
        logits = h @ weight.t()
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        torch.cuda.synchronize()
        return h.grad

    for _ in range(3):
        step()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() - base
    print(json.dumps({
        "bench": "linear_cross_entropy_fwd_bwd",
        "impl": "torch_eager_materialised",
        "dtype": "bf16",
        "tokens": tokens,
        "vocab": vocab,
        "hidden": width,
        "ms": round(times[len(times) // 2], 3),
        "peak_above_inputs_mib": round(peak / 2**20, 1),
        "inputs_mib": round(base / 2**20, 1),
    }))


if __name__ == "__main__":
    main()
