# Whether stacking projections that share an input (gate|up, q|k|v) into one GEMM pays, bf16,
# cuBLAS through torch: per-projection GEMMs against one GEMM over the concatenated weights, with
# and without a β-accumulated C, and the backward's dx (sum of per-projection products against one
# product over the stacked K). Run on the GPU machine: python3 xtask/peers/stacked_gemm_probe.py
import torch, sys
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
dev = "cuda"
def bench(f, n=30):
    for _ in range(5): f()
    torch.cuda.synchronize()
    s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts)//2]
def case(name, N, H, outs, r=16):
    x = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(o, H, device=dev, dtype=torch.bfloat16) * 0.02 for o in outs]
    w = torch.cat(ws, 0)
    us = [torch.randn(N, o, device=dev, dtype=torch.bfloat16) for o in outs]
    u = torch.cat(us, 1)
    flops = 2 * N * H * sum(outs)
    sep = bench(lambda: [torch.addmm(ui, x, wi.t()) for ui, wi in zip(us, ws)])
    one = bench(lambda: torch.addmm(u, x, w.t()))
    sep0 = bench(lambda: [x @ wi.t() for wi in ws])
    one0 = bench(lambda: x @ w.t())
    # backward dx = sum_i dy_i W_i  vs  dY W
    dys = us; dY = u
    def sep_dx():
        acc = dys[0] @ ws[0]
        for d, wi in zip(dys[1:], ws[1:]):
            acc = torch.addmm(acc, d, wi)
        return acc
    bsep = bench(sep_dx)
    bone = bench(lambda: dY @ w)
    t = lambda ms: f"{ms:.3f} ms ({flops/ms/1e9:.0f} TF/s)"
    print(f"{name}: fwd+C sep {t(sep)} one {t(one)} | fwd sep {t(sep0)} one {t(one0)} | dx sep {t(bsep)} one {t(bone)}")
case("1B gate/up", 8192, 2048, [8192, 8192])
case("1B qkv", 8192, 2048, [2048, 512, 512])
case("8B gate/up", 4096, 4096, [14336, 14336])
case("8B qkv", 4096, 4096, [4096, 1024, 1024])
case("smol gate/up", 16384, 576, [1536, 1536])
case("smol qkv", 16384, 576, [576, 192, 192])
