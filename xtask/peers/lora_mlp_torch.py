"""PyTorch eager peer of `mlp-bench`: the LoRA SwiGLU MLP forward + backward in bf16 on the GPU,
the way PEFT computes it (frozen base Linear, LoRA A/B trainable, x requires grad).

Usage: python3 xtask/peers/lora_mlp_torch.py [tokens hidden intermediate rank]
(default 8192 2048 8192 16). Prints the median of 10 timed iterations after 3 warm-up ones.
"""
import sys
import time

import torch
import torch.nn.functional as F


def main():
    n, d, i, r = (int(a) for a in sys.argv[1:5]) if len(sys.argv) == 5 else (8192, 2048, 8192, 16)
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)

    def proj(d_in, d_out):
        w = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in**0.5
        a = (torch.randn(r, d_in, device=dev, dtype=dt) / d_in**0.5).requires_grad_()
        b = (torch.randn(d_out, r, device=dev, dtype=dt) / r**0.5).requires_grad_()
        return w, a, b

    gate, up, down = proj(d, i), proj(d, i), proj(i, d)
    x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    cot = torch.randn(n, d, device=dev, dtype=dt)

    def lora(x, p):
        w, a, b = p
        return F.linear(x, w) + F.linear(F.linear(x, a), b)

    def step():
        y = lora(F.silu(lora(x, gate)) * lora(x, up), down)
        y.backward(cot)
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    ms = sorted(times)[len(times) // 2]
    base_flops = 6 * 2 * n * d * i
    print(f"torch eager {ms:8.3f} ms   {base_flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s (base GEMM FLOPs only)")


if __name__ == "__main__":
    main()
