//! `gemm-check`: correctness, ordering and speed of the cuBLAS GEMM provider on a CUDA GPU.
//!
//! 1. Correctness against Burn's own matmul on `CubeBackend<CudaRuntime>` and against an f64
//!    host reference: f32/f16/bf16, ragged shapes, all four transpose combinations, α/β
//!    accumulation, batched and broadcast operands, transposed views, offset slices and strided
//!    operands; every output lands in memory first filled with NaN (a NaN tensor of the output's
//!    size is created and dropped just before, so CubeCL's pool hands its memory to the output).
//! 2. Ordering: a CubeCL kernel writes A, the GEMM reads it at once, another kernel reads D, with
//!    no synchronisation in between, many times with fresh values; also from a second thread's
//!    stream.
//! 3. Host offload: tensors to pinned memory and back on the copy stream (prefetched), bitwise,
//!    with kernels reusing the freed memory in between and no synchronisation.
//! 4. Nested persistent-allocation scopes keep exact-size buffers after the inner scope ends.
//! 5. Speed: bf16 8192³ (median of timed batches between device syncs) for the provider (cuBLASLt
//!    and cuBLAS) and Burn's matmul, in TFLOP/s, plus LoRA-shaped products and per-call overhead.
//!
//! Exits with status 1 if any check fails. `--quick` skips the benchmarks; `--only a,b` runs only
//! the named sections (`ordering`, `persistent`, `host-copy`, `bench`, `correctness`,
//! `autotune`). Sections run in that order
//! (the cheapest, most telling first), each guarded against panics.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use burn::prelude::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};
use cubecl::cuda::CudaDevice;
use fastlora_cuda_gemm::{
    CudaBackend, CudaTensor, Engine, GemmOp, copy_to_device, copy_to_host, gemm, matmul_nt,
    matmul_nt_tensor, stream_ordering, with_persistent_allocation,
};

type B = CudaBackend<f32, i32, u8>;

/// Deterministic values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn tensor<const D: usize>(
    rng: &mut Rng,
    shape: [usize; D],
    dtype: DType,
    device: &CudaDevice,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(rng.vec(n), shape), (device, dtype))
}

fn values<const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.to_data().iter::<f32>().collect()
}

fn prim<const D: usize>(t: &Tensor<B, D>) -> CudaTensor {
    t.clone().into_primitive().tensor()
}

fn from_prim<const D: usize>(t: CudaTensor) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn sync(device: &CudaDevice) {
    B::sync(device).expect("device sync");
}

/// Fills the pool with a NaN buffer of `shape`/`dtype` and frees it, so the next allocation of
/// that size (the GEMM's output) reuses NaN memory.
fn poison(shape: &[usize], dtype: DType, device: &CudaDevice) {
    let n: usize = shape.iter().product();
    let t: Tensor<B, 1> = Tensor::full([n], f32::NAN, (device, dtype));
    sync(device);
    drop(t);
}

/// Norm-wise relative error `max|x - y| / max|y|`; infinite if `x` has a non-finite value.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .fold(0f64, |m, &y| m.max((y as f64).abs()))
        .max(1e-12);
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    err / scale
}

/// f64 reference `α·op(A)·op(B) + β·C` per batch entry; `a`/`b` given as stored (row-major).
#[allow(clippy::too_many_arguments)]
fn host_gemm(
    a: &[f32],
    b: &[f32],
    c: Option<&[f32]>,
    batch: (usize, usize),
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let out_batch = batch.0.max(batch.1);
    let mut out = vec![0f32; out_batch * m * n];
    let threads = std::thread::available_parallelism()
        .map_or(4, |p| p.get())
        .min(16);
    let rows_per = m.div_ceil(threads).max(1);
    for (bt, chunk) in out.chunks_mut(m * n).enumerate() {
        let a = &a[if batch.0 == 1 { 0 } else { bt * m * k }..][..m * k];
        let b = &b[if batch.1 == 1 { 0 } else { bt * k * n }..][..k * n];
        let c = c.map(|c| &c[bt * m * n..][..m * n]);
        // op(A) row-major [m, k], op(B)ᵀ row-major [n, k], for contiguous dot products.
        let opa: Vec<f64> = (0..m * k)
            .map(|x| {
                let (i, l) = (x / k, x % k);
                (if ta { a[l * m + i] } else { a[i * k + l] }) as f64
            })
            .collect();
        let opbt: Vec<f64> = (0..n * k)
            .map(|x| {
                let (j, l) = (x / k, x % k);
                (if tb { b[j * k + l] } else { b[l * n + j] }) as f64
            })
            .collect();
        let (opa, opbt) = (&opa, &opbt);
        std::thread::scope(|s| {
            for (t, rows) in chunk.chunks_mut(rows_per * n).enumerate() {
                s.spawn(move || {
                    for (r, row) in rows.chunks_mut(n).enumerate() {
                        let i = t * rows_per + r;
                        let ai = &opa[i * k..(i + 1) * k];
                        for (j, out) in row.iter_mut().enumerate() {
                            let bj = &opbt[j * k..(j + 1) * k];
                            let dot: f64 = ai.iter().zip(bj).map(|(x, y)| x * y).sum();
                            let acc = c.map_or(0.0, |c| c[i * n + j] as f64 * beta as f64);
                            *out = (alpha as f64 * dot + acc) as f32;
                        }
                    }
                });
            }
        });
    }
    out
}

/// Burn's own matmul (default, untuned strategy) on the primitives, with α/β applied by Burn ops.
fn burn_gemm<const D: usize>(
    a: &Tensor<B, D>,
    b: &Tensor<B, D>,
    c: Option<&Tensor<B, D>>,
    op: &GemmOp,
) -> Tensor<B, D> {
    let a = if op.trans_a {
        a.clone().transpose()
    } else {
        a.clone()
    };
    let b = if op.trans_b {
        b.clone().transpose()
    } else {
        b.clone()
    };
    let dtype = a.dtype();
    let out = matmul(prim(&a), prim(&b), None, MatmulStrategy::Cube, dtype).expect("burn matmul");
    let mut out: Tensor<B, D> = from_prim(out);
    if op.alpha != 1.0 {
        out = out.mul_scalar(op.alpha);
    }
    if let Some(c) = c {
        out = out + c.clone().mul_scalar(op.beta);
    }
    out
}

struct Checks {
    failures: Vec<String>,
    count: usize,
}

impl Checks {
    fn record(&mut self, name: &str, burn: Option<(f64, f64)>, host: (f64, f64)) {
        self.count += 1;
        let burn_ok = burn.is_none_or(|(e, tol)| e <= tol);
        let host_ok = host.0 <= host.1;
        let status = if burn_ok && host_ok { "ok  " } else { "FAIL" };
        let burn_txt = burn.map_or("       -       ".to_string(), |(e, tol)| {
            format!("{e:9.2e} (≤{tol:.0e})")
        });
        println!(
            "  {status} {name:<64} vs burn {burn_txt}  vs host {:9.2e} (≤{:.0e})",
            host.0, host.1
        );
        if !(burn_ok && host_ok) {
            self.failures.push(name.to_string());
        }
    }
    fn fail(&mut self, name: String) {
        self.count += 1;
        println!("  FAIL {name}");
        self.failures.push(name);
    }
}

fn tolerances(dtype: DType, tf32: bool) -> (f64, f64) {
    // (vs Burn, vs host). Burn's f32 matmul runs on TF32 tensor cores on sm_80+ (cubek-matmul
    // stages f32 as tf32 when supported), so the 1e-4 f32 bound is checked against the host.
    match dtype {
        DType::F32 if tf32 => (1e-2, 1e-2),
        DType::F32 => (1e-2, 1e-4),
        _ => (2e-2, 2e-2),
    }
}

#[derive(Clone, Copy)]
struct Case {
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    op: GemmOp,
    with_c: bool,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "?",
    }
}

/// Rank-2 case against Burn and the host reference.
fn check_case(checks: &mut Checks, rng: &mut Rng, device: &CudaDevice, case: Case) {
    let Case {
        dtype,
        m,
        n,
        k,
        op,
        with_c,
    } = case;
    let a_shape = if op.trans_a { [k, m] } else { [m, k] };
    let b_shape = if op.trans_b { [n, k] } else { [k, n] };
    let a = tensor(rng, a_shape, dtype, device);
    let b = tensor(rng, b_shape, dtype, device);
    let c = with_c.then(|| tensor(rng, [m, n], dtype, device));
    let name = format!(
        "{} {m}x{k}x{n} {}{} α{} β{} {:?}{}",
        dtype_name(dtype),
        if op.trans_a { "T" } else { "N" },
        if op.trans_b { "T" } else { "N" },
        op.alpha,
        op.beta,
        op.engine,
        if op.allow_tf32 { " tf32" } else { "" }
    );
    poison(&[m, n], dtype, device);
    let out = match gemm(&prim(&a), &prim(&b), c.as_ref().map(prim).as_ref(), op) {
        Ok(out) => from_prim::<2>(out),
        Err(e) => return checks.fail(format!("{name}: {e}")),
    };
    let got = values(&out);
    let want_burn = values(&burn_gemm(&a, &b, c.as_ref(), &op));
    let want_host = host_gemm(
        &values(&a),
        &values(&b),
        c.as_ref().map(values).as_deref(),
        (1, 1),
        (m, n, k),
        (op.trans_a, op.trans_b),
        op.alpha,
        op.beta,
    );
    let (tol_burn, tol_host) = tolerances(dtype, op.allow_tf32);
    checks.record(
        &name,
        Some((rel_err(&got, &want_burn), tol_burn)),
        (rel_err(&got, &want_host), tol_host),
    );
}

fn correctness(checks: &mut Checks, device: &CudaDevice) {
    println!("== correctness (output memory NaN-poisoned before every GEMM)");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let trans = [(false, false), (false, true), (true, false), (true, true)];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut run =
            |(m, n, k): (usize, usize, usize), (trans_a, trans_b), alpha, beta, engine| {
                let with_c = beta != 0.0;
                let op = GemmOp {
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                    engine,
                    ..GemmOp::default()
                };
                check_case(
                    checks,
                    &mut rng,
                    device,
                    Case {
                        dtype,
                        m,
                        n,
                        k,
                        op,
                        with_c,
                    },
                );
            };
        // All transposes on the ragged shapes (M x K x N = 37x24x40, 1000x513x257).
        for shape in [(37, 40, 24), (1000, 257, 513)] {
            for t in trans {
                run(shape, t, 1.0, 0.0, Engine::Lt);
            }
        }
        // A LoRA-like thin product, β accumulation, and the legacy cuBLAS engine.
        run((64, 16, 4096), (false, true), 1.0, 0.0, Engine::Lt);
        run((37, 40, 24), (false, true), 0.5, 2.0, Engine::Lt);
        run((1000, 257, 513), (true, false), 0.5, 2.0, Engine::Lt);
        run((1000, 257, 513), (false, false), 1.0, 0.0, Engine::Legacy);
        run((37, 40, 24), (true, true), 0.5, 2.0, Engine::Legacy);
    }
    // TF32 on request.
    let op = GemmOp {
        allow_tf32: true,
        trans_b: true,
        ..GemmOp::default()
    };
    check_case(
        checks,
        &mut rng,
        device,
        Case {
            dtype: DType::F32,
            m: 1000,
            n: 257,
            k: 513,
            op,
            with_c: false,
        },
    );

    for dtype in [DType::F32, DType::BF16] {
        let (tol_burn, tol_host) = tolerances(dtype, false);
        let d = dtype_name(dtype);
        // β = 0 with a NaN C: C must not be read.
        for engine in [Engine::Lt, Engine::Legacy] {
            let a = tensor(&mut rng, [37, 24], dtype, device);
            let b = tensor(&mut rng, [24, 40], dtype, device);
            let c: Tensor<B, 2> = Tensor::full([37, 40], f32::NAN, (device, dtype));
            let op = GemmOp {
                engine,
                ..GemmOp::default()
            };
            let name = format!("{d} 37x24x40 NN β0 with NaN C {engine:?}");
            match gemm(&prim(&a), &prim(&b), Some(&prim(&c)), op) {
                Ok(out) => {
                    let got = values(&from_prim::<2>(out));
                    let want = host_gemm(
                        &values(&a),
                        &values(&b),
                        None,
                        (1, 1),
                        (37, 40, 24),
                        (false, false),
                        1.0,
                        0.0,
                    );
                    checks.record(&name, None, (rel_err(&got, &want), tol_host));
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }
        }

        // Transposed views (column-major operands read in place) and an offset slice.
        {
            let (m, n, k) = (37, 40, 24);
            let a_km = tensor(&mut rng, [k, m], dtype, device);
            let b_nk = tensor(&mut rng, [n, k], dtype, device);
            let a_view = a_km.clone().transpose(); // [m, k], strides [1, m]
            let b_view = b_nk.clone().transpose(); // [k, n], strides [1, k]
            poison(&[m, n], dtype, device);
            let name = format!("{d} {m}x{k}x{n} transposed views (col-major operands)");
            match gemm(&prim(&a_view), &prim(&b_view), None, GemmOp::default()) {
                Ok(out) => {
                    let got = values(&from_prim::<2>(out));
                    let want_burn = values(&burn_gemm(&a_view, &b_view, None, &GemmOp::default()));
                    let want = host_gemm(
                        &values(&a_km),
                        &values(&b_nk),
                        None,
                        (1, 1),
                        (m, n, k),
                        (true, true),
                        1.0,
                        0.0,
                    );
                    checks.record(
                        &name,
                        Some((rel_err(&got, &want_burn), tol_burn)),
                        (rel_err(&got, &want), tol_host),
                    );
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }

            let big = tensor(&mut rng, [64, 64], dtype, device);
            let a_slice = big.clone().slice([5..42, 8..32]); // [37, 24] at an odd offset, row pitch 64
            let b = tensor(&mut rng, [k, n], dtype, device);
            let name = format!("{d} {m}x{k}x{n} offset slice (pitch 64) NN");
            poison(&[m, n], dtype, device);
            match gemm(&prim(&a_slice), &prim(&b), None, GemmOp::default()) {
                Ok(out) => {
                    let got = values(&from_prim::<2>(out));
                    let want_burn = values(&burn_gemm(&a_slice, &b, None, &GemmOp::default()));
                    let want = host_gemm(
                        &values(&a_slice),
                        &values(&b),
                        None,
                        (1, 1),
                        (m, n, k),
                        (false, false),
                        1.0,
                        0.0,
                    );
                    checks.record(
                        &name,
                        Some((rel_err(&got, &want_burn), tol_burn)),
                        (rel_err(&got, &want), tol_host),
                    );
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }
        }

        // Batched, broadcast, strided (copied) and folded operands.
        {
            let (bt, m, n, k) = (3, 37, 40, 24);
            let a = tensor(&mut rng, [bt, m, k], dtype, device);
            let b = tensor(&mut rng, [bt, k, n], dtype, device);
            let c = tensor(&mut rng, [bt, m, n], dtype, device);
            let op = GemmOp {
                alpha: 1.5,
                beta: -1.0,
                ..GemmOp::default()
            };
            let name = format!("{d} batched {bt}x[{m}x{k}x{n}] + β C");
            poison(&[bt, m, n], dtype, device);
            match gemm(&prim(&a), &prim(&b), Some(&prim(&c)), op) {
                Ok(out) => {
                    let got = values(&from_prim::<3>(out));
                    let want_burn = values(&burn_gemm(&a, &b, Some(&c), &op));
                    let want = host_gemm(
                        &values(&a),
                        &values(&b),
                        Some(&values(&c)),
                        (bt, bt),
                        (m, n, k),
                        (false, false),
                        1.5,
                        -1.0,
                    );
                    checks.record(
                        &name,
                        Some((rel_err(&got, &want_burn), tol_burn)),
                        (rel_err(&got, &want), tol_host),
                    );
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }

            let w = tensor(&mut rng, [k, n], dtype, device);
            let name = format!("{d} broadcast {bt}x[{m}x{k}] · [{k}x{n}]");
            poison(&[bt, m, n], dtype, device);
            match gemm(&prim(&a), &prim(&w), None, GemmOp::default()) {
                Ok(out) => {
                    let got = values(&from_prim::<3>(out));
                    let w3: Tensor<B, 3> = w.clone().unsqueeze::<3>().repeat_dim(0, bt);
                    let want_burn = values(&burn_gemm(&a, &w3, None, &GemmOp::default()));
                    let want = host_gemm(
                        &values(&a),
                        &values(&w),
                        None,
                        (bt, 1),
                        (m, n, k),
                        (false, false),
                        1.0,
                        0.0,
                    );
                    checks.record(
                        &name,
                        Some((rel_err(&got, &want_burn), tol_burn)),
                        (rel_err(&got, &want), tol_host),
                    );
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }

            // [m, k, bt] permuted to [bt, m, k]: no unit stride in the matrix, so it is copied.
            let raw = tensor(&mut rng, [m, k, bt], dtype, device);
            let strided = raw.permute([2, 0, 1]);
            let name = format!("{d} strided operand (copied) {bt}x[{m}x{k}x{n}]");
            poison(&[bt, m, n], dtype, device);
            match gemm(&prim(&strided), &prim(&b), None, GemmOp::default()) {
                Ok(out) => {
                    let got = values(&from_prim::<3>(out));
                    let want_burn = values(&burn_gemm(&strided, &b, None, &GemmOp::default()));
                    let want = host_gemm(
                        &values(&strided),
                        &values(&b),
                        None,
                        (bt, bt),
                        (m, n, k),
                        (false, false),
                        1.0,
                        0.0,
                    );
                    checks.record(
                        &name,
                        Some((rel_err(&got, &want_burn), tol_burn)),
                        (rel_err(&got, &want), tol_host),
                    );
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }

            // matmul_nt on [2, 64, 256] x [128, 256]: the batch folds into one GEMM.
            let x = tensor(&mut rng, [2, 64, 256], dtype, device);
            let wt = tensor(&mut rng, [128, 256], dtype, device);
            let name = format!("{d} matmul_nt [2,64,256]·[128,256]ᵀ (folded)");
            poison(&[2, 64, 128], dtype, device);
            match matmul_nt(&prim(&x), &prim(&wt)) {
                Ok(out) => {
                    let got = values(&from_prim::<3>(out));
                    let w3: Tensor<B, 3> = wt.clone().unsqueeze::<3>().repeat_dim(0, 2);
                    let want_burn = values(&burn_gemm(&x, &w3, None, &GemmOp::nt()));
                    let want = host_gemm(
                        &values(&x),
                        &values(&wt),
                        None,
                        (2, 1),
                        (64, 128, 256),
                        (false, true),
                        1.0,
                        0.0,
                    );
                    checks.record(
                        &name,
                        Some((rel_err(&got, &want_burn), tol_burn)),
                        (rel_err(&got, &want), tol_host),
                    );
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }

            // The Burn-tensor wrapper on a rank-4 input.
            let x4 = tensor(&mut rng, [2, 3, 5, 32], dtype, device);
            let w4 = tensor(&mut rng, [16, 32], dtype, device);
            let name = format!("{d} matmul_nt_tensor [2,3,5,32]·[16,32]ᵀ");
            match matmul_nt_tensor(x4.clone(), w4.clone()) {
                Ok(out) => {
                    let dims_ok = out.dims() == [2, 3, 5, 16];
                    let got = values(&out);
                    let want = host_gemm(
                        &values(&x4),
                        &values(&w4),
                        None,
                        (1, 1),
                        (30, 16, 32),
                        (false, true),
                        1.0,
                        0.0,
                    );
                    if dims_ok {
                        checks.record(&name, None, (rel_err(&got, &want), tol_host));
                    } else {
                        checks.fail(format!("{name}: dims {:?}", out.dims()));
                    }
                }
                Err(e) => checks.fail(format!("{name}: {e}")),
            }
        }
    }

    // Errors are reported, not panics.
    let a = tensor(&mut rng, [4, 5], DType::BF16, device);
    let b = tensor(&mut rng, [6, 7], DType::BF16, device);
    match gemm(&prim(&a), &prim(&b), None, GemmOp::default()) {
        Err(e) => println!("  ok   shape mismatch rejected: {e}"),
        Ok(_) => checks.fail("shape mismatch accepted".into()),
    }
}

/// A CubeCL kernel writes A, the GEMM reads it at once, a CubeCL kernel reads D; no syncs.
fn ordering(checks: &mut Checks, device: &CudaDevice) {
    println!("== ordering with CubeCL kernels (no synchronisation inside the loops)");
    let mut rng = Rng(42);
    for (dtype, size, iters, engine) in [
        (DType::F32, 1024, 200, Engine::Lt),
        (DType::BF16, 4096, 100, Engine::Lt),
        (DType::BF16, 2048, 50, Engine::Legacy),
    ] {
        let base = tensor(&mut rng, [size, size], dtype, device);
        let w = tensor(&mut rng, [size, size], dtype, device);
        let op = GemmOp {
            engine,
            ..GemmOp::nt()
        };
        // Reference total Σ(base·wᵀ), computed once with syncs.
        let reference = {
            let d = from_prim::<2>(gemm(&prim(&base), &prim(&w), None, op).expect("gemm"));
            let s = d.cast(DType::F32).sum();
            values(&s)[0] as f64
        };
        sync(device);
        let mut sums = Vec::with_capacity(iters);
        let start = Instant::now();
        for i in 0..iters {
            let scale = (i % 7) as f32 + 1.0;
            let a = base.clone().mul_scalar(scale); // CubeCL writes A (a fresh buffer each time)
            let d = match gemm(&prim(&a), &prim(&w), None, op) {
                Ok(d) => from_prim::<2>(d),
                Err(e) => return checks.fail(format!("ordering {dtype:?}: {e}")),
            };
            drop(a); // A's memory returns to the pool at once; the next iteration's A reuses it
            sums.push(d.cast(DType::F32).sum().mul_scalar(1.0 / scale)); // CubeCL reads D
        }
        let sums: Vec<f64> = sums.iter().map(|s| values(s)[0] as f64).collect();
        let elapsed = start.elapsed();
        let worst = sums
            .iter()
            .map(|s| ((s - reference) / reference.abs().max(1e-9)).abs())
            .fold(0f64, f64::max);
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        let name = format!(
            "{} {size}² x{iters} {engine:?}: worst |Σ/scale − Σ₀|/|Σ₀| = {worst:.2e} (≤{tol:.0e}), {:.1} ms",
            dtype_name(dtype),
            elapsed.as_secs_f64() * 1e3
        );
        if worst <= tol && sums.iter().all(|s| s.is_finite()) {
            checks.count += 1;
            println!("  ok   {name}");
        } else {
            checks.fail(name);
        }
    }

    // Operands made by another thread (another CubeCL stream).
    let (m, n, k) = (512, 384, 256);
    let dev = device.clone();
    let (a, b) = std::thread::spawn(move || {
        let mut rng = Rng(7);
        let a = tensor(&mut rng, [m, k], DType::BF16, &dev).mul_scalar(2.0);
        let b = tensor(&mut rng, [k, n], DType::BF16, &dev);
        (a, b)
    })
    .join()
    .expect("producer thread");
    match gemm(&prim(&a), &prim(&b), None, GemmOp::default()) {
        Ok(out) => {
            let got = values(&from_prim::<2>(out));
            let want = host_gemm(
                &values(&a),
                &values(&b),
                None,
                (1, 1),
                (m, n, k),
                (false, false),
                1.0,
                0.0,
            );
            checks.record(
                "bf16 operands from another thread's stream",
                None,
                (rel_err(&got, &want), 2e-2),
            );
        }
        Err(e) => checks.fail(format!("cross-thread: {e}")),
    }
}

/// Host offload with overlapped copies, as gradient checkpointing uses it: layer-sized bf16
/// tensors go to pinned memory while kernels keep running and writing NaN into freshly
/// allocated buffers (which reuse the memory the offloaded tensors free), then come back in
/// reverse order (the first one copied on demand, each later one prefetched), each read by a
/// kernel at once — no synchronisation inside the loops. Every tensor is `base·(−2)ⁱ`, exact in
/// bf16, so the check is bit for bit. A prefetched copy that is dropped unused must not disturb
/// anything. Prints the time of the offload round trip beside the same GEMM load without it.
fn host_copies(checks: &mut Checks, device: &CudaDevice) {
    println!("== host offload (copy stream, events, prefetch), bitwise, no syncs in the loops");
    let mut rng = Rng(99);
    let layers = 8;
    let shape = [4, 1024, 1024]; // 8 MiB in bf16
    let base = tensor(&mut rng, shape, DType::BF16, device);
    let base_values = values(&base);
    let load = tensor(&mut rng, [4096, 4096], DType::BF16, device);
    let busy = |n: usize| {
        for _ in 0..n {
            let out = gemm(&prim(&load), &prim(&load), None, GemmOp::nt()).expect("gemm");
            drop(out);
        }
    };
    let scale = |i: usize| (-2f32).powi(i as i32);
    sync(device);
    let run = |offload: bool| -> (Vec<Tensor<B, 3>>, Duration) {
        let start = Instant::now();
        let mut copies = Vec::new();
        for i in 0..layers {
            let x = base.clone().mul_scalar(scale(i));
            if offload {
                copies.push(copy_to_host(prim(&x)).expect("copy_to_host"));
            }
            drop(x);
            let junk = base.clone().mul_scalar(f32::NAN);
            busy(4);
            drop(junk);
        }
        let mut back = Vec::new();
        for _ in 0..layers {
            busy(4);
            if let Some(copy) = copies.pop() {
                let x = from_prim::<3>(copy_to_device(copy).expect("copy_to_device"));
                back.push(x.mul_scalar(1.0));
            }
            let junk = base.clone().mul_scalar(f32::NAN);
            drop(junk);
        }
        sync(device);
        (back, start.elapsed())
    };
    let (_, alone) = run(false);
    // Twice: the first pass allocates the pinned blocks, the second reuses them (a training
    // step's case); both are checked, the second is timed.
    let (first, _) = run(true);
    let (second, with_copies) = run(true);
    for (k, x) in first.iter().chain(&second).enumerate() {
        let k = k % layers;
        let i = layers - 1 - k;
        let got = values(x);
        let want: Vec<f32> = base_values.iter().map(|v| v * scale(i)).collect();
        let mismatches = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        let name = format!(
            "offload {i} ({} from {}): {mismatches} of {} values differ",
            if k == 0 {
                "copied on demand"
            } else {
                "prefetched"
            },
            dtype_name(DType::BF16),
            got.len()
        );
        if mismatches == 0 {
            checks.count += 1;
            println!("  ok   {name}");
        } else {
            checks.fail(name);
        }
    }
    println!(
        "  {layers} round trips of 8 MiB beside 64 GEMMs 4096², pinned blocks reused: {:.2} ms \
         (GEMMs alone {:.2} ms)",
        with_copies.as_secs_f64() * 1e3,
        alone.as_secs_f64() * 1e3
    );
    // A prefetched copy dropped unused: its device buffer is released only after its copy ends.
    let a = copy_to_host(prim(&base.clone().mul_scalar(2.0))).expect("copy_to_host");
    let b = copy_to_host(prim(&base.clone().mul_scalar(4.0))).expect("copy_to_host");
    let b = from_prim::<3>(copy_to_device(b).expect("copy_to_device")); // prefetches `a`
    drop(a);
    let junk = base.clone().mul_scalar(f32::NAN);
    let c = copy_to_host(prim(&base.clone().mul_scalar(8.0))).expect("copy_to_host");
    let c = from_prim::<3>(copy_to_device(c).expect("copy_to_device"));
    drop(junk);
    let ok = values(&b)
        .iter()
        .zip(values(&c))
        .zip(&base_values)
        .all(|((b, c), v)| {
            b.to_bits() == (v * 4.0).to_bits() && c.to_bits() == (v * 8.0).to_bits()
        });
    let name = "a prefetched copy dropped unused; later copies intact".to_string();
    if ok {
        checks.count += 1;
        println!("  ok   {name}");
    } else {
        checks.fail(name);
    }
}

/// Median per-call time of `f`, timed in batches of `per` calls between device syncs.
fn time(device: &CudaDevice, samples: usize, per: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    sync(device);
    let mut times: Vec<Duration> = (0..samples)
        .map(|_| {
            sync(device);
            let t = Instant::now();
            for _ in 0..per {
                f();
            }
            sync(device);
            t.elapsed() / per as u32
        })
        .collect();
    times.sort();
    times[samples / 2]
}

/// Nested persistent scopes: a buffer allocated in the outer scope after an inner one ended
/// still gets its exact size (the inner scope must not put the stream back on the paged pools,
/// where a 100 MB buffer takes a 2.2 GB page on an H200).
fn persistent_scopes(c: &mut Checks, device: &CudaDevice) {
    println!("== nested persistent scopes");
    let client = <cubecl::cuda::CudaRuntime as cubecl::Runtime>::client(device);
    let reserved = || client.memory_usage().expect("memory usage").bytes_reserved;
    // Sizes no earlier section used, so no freed buffer of the same size is reused.
    let sizes = [25_000_013usize, 25_000_041];
    let (kept, grew) = with_persistent_allocation(device, || {
        let inner = with_persistent_allocation(device, || {
            let before = reserved();
            let t = Tensor::<B, 1>::zeros([sizes[0]], device);
            (t, reserved() - before)
        });
        let before = reserved();
        let outer = Tensor::<B, 1>::zeros([sizes[1]], device);
        ([inner.0, outer], [inner.1, reserved() - before])
    });
    for ((size, grew), what) in sizes
        .iter()
        .zip(grew)
        .zip(["inner scope", "outer scope, after the inner one"])
    {
        let bytes = (size * 4) as u64;
        let name = format!("exact-size buffer in the {what}: {bytes} bytes reserved {grew}");
        if grew >= bytes && grew < bytes + 4096 {
            c.count += 1;
            println!("  ok   {name}");
        } else {
            c.fail(name);
        }
    }
    drop(kept);
}

fn bench(device: &CudaDevice) {
    println!("== speed (median of ≥10 timed batches, device sync around each batch)");
    let mut rng = Rng(3);
    let tflops = |m: usize, n: usize, k: usize, t: Duration| {
        2.0 * (m * n * k) as f64 / t.as_secs_f64() / 1e12
    };

    let s = 8192;
    let a = tensor(&mut rng, [s, s], DType::BF16, device);
    let b = tensor(&mut rng, [s, s], DType::BF16, device);
    let (pa, pb) = (prim(&a), prim(&b));
    let mut rows: Vec<(&str, Duration)> = Vec::new();
    for (name, engine) in [
        ("provider cuBLASLt", Engine::Lt),
        ("provider cuBLAS gemm_ex", Engine::Legacy),
    ] {
        let op = GemmOp {
            engine,
            ..GemmOp::default()
        };
        let t = time(device, 15, 5, || {
            drop(gemm(&pa, &pb, None, op).expect("gemm"))
        });
        rows.push((name, t));
    }
    let t = time(device, 11, 3, || {
        drop(
            matmul(
                pa.clone(),
                pb.clone(),
                None,
                MatmulStrategy::Cube,
                DType::BF16,
            )
            .expect("matmul"),
        )
    });
    rows.push(("burn CubeBackend matmul (default strategy)", t));
    for (name, t) in rows {
        println!(
            "  bf16 8192³ NN {name:<44} {:8.3} ms  {:7.1} TFLOP/s",
            t.as_secs_f64() * 1e3,
            tflops(s, s, s, t)
        );
    }

    // LoRA / Linear shapes (x·wᵀ), provider vs Burn (with w.transpose() view).
    for (m, n, k) in [
        (8192, 4096, 4096),
        (8192, 14336, 4096),
        (8192, 16, 4096),
        (8192, 4096, 16),
    ] {
        let x = tensor(&mut rng, [m, k], DType::BF16, device);
        let w = tensor(&mut rng, [n, k], DType::BF16, device);
        let (px, pw) = (prim(&x), prim(&w));
        let pwt = prim(&w.clone().transpose());
        let t_lt = time(device, 11, 5, || drop(matmul_nt(&px, &pw).expect("gemm")));
        let t_burn = time(device, 11, 3, || {
            drop(
                matmul(
                    px.clone(),
                    pwt.clone(),
                    None,
                    MatmulStrategy::Cube,
                    DType::BF16,
                )
                .expect("matmul"),
            )
        });
        println!(
            "  bf16 x[{m},{k}]·w[{n},{k}]ᵀ  provider {:8.3} ms {:7.1} TFLOP/s | burn {:8.3} ms {:7.1} TFLOP/s",
            t_lt.as_secs_f64() * 1e3,
            tflops(m, n, k, t_lt),
            t_burn.as_secs_f64() * 1e3,
            tflops(m, n, k, t_burn)
        );
    }

    // Host overhead per call on a tiny GEMM (enqueue cost, not GPU time).
    let x = prim(&tensor(&mut rng, [64, 64], DType::BF16, device));
    let w = prim(&tensor(&mut rng, [64, 64], DType::BF16, device));
    let t = time(device, 10, 200, || drop(matmul_nt(&x, &w).expect("gemm")));
    let tb = time(device, 10, 200, || {
        drop(
            matmul(
                x.clone(),
                w.clone(),
                None,
                MatmulStrategy::Cube,
                DType::BF16,
            )
            .expect("matmul"),
        )
    });
    println!(
        "  bf16 64³ per call (launch-bound)  provider {:6.1} µs | burn {:6.1} µs",
        t.as_secs_f64() * 1e6,
        tb.as_secs_f64() * 1e6
    );
}

/// Burn's autotuned matmul at bf16 8192³ (compiles and times many kernels on first use).
#[cfg(feature = "burn-autotune")]
fn bench_autotune(device: &CudaDevice) {
    let mut rng = Rng(3);
    let s = 8192;
    let a = prim(&tensor(&mut rng, [s, s], DType::BF16, device));
    let b = prim(&tensor(&mut rng, [s, s], DType::BF16, device));
    let t = time(device, 11, 3, || {
        drop(
            matmul(
                a.clone(),
                b.clone(),
                None,
                MatmulStrategy::Autotune,
                DType::BF16,
            )
            .expect("matmul"),
        )
    });
    println!(
        "  bf16 8192³ NN {:<44} {:8.3} ms  {:7.1} TFLOP/s",
        "burn CubeBackend matmul (autotune)",
        t.as_secs_f64() * 1e3,
        2.0 * (s * s * s) as f64 / t.as_secs_f64() / 1e12
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_string).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let device = CudaDevice::default();
    let started = Instant::now();
    let mut checks = Checks {
        failures: Vec::new(),
        count: 0,
    };
    // A panic in one section (e.g. a Burn kernel failing to compile) is a failure, not the end.
    // Ordering and speed first: they matter most if the run is cut short.
    let mut section = |name: &str, f: &mut dyn FnMut(&mut Checks)| {
        let t = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut checks)));
        if result.is_err() {
            checks.fail(format!("{name}: panicked"));
        }
        println!("   ({name}: {:.1} s)", t.elapsed().as_secs_f64());
    };
    if wanted("ordering") {
        section("ordering", &mut |c| ordering(c, &device));
    }
    if wanted("persistent") {
        section("persistent", &mut |c| persistent_scopes(c, &device));
    }
    if wanted("host-copy") {
        section("host-copy", &mut |c| host_copies(c, &device));
    }
    if !quick && wanted("bench") {
        section("bench", &mut |_| bench(&device));
    }
    if wanted("correctness") {
        section("correctness", &mut |c| correctness(c, &device));
    }
    #[cfg(feature = "burn-autotune")]
    if !quick && wanted("autotune") {
        section("autotune", &mut |_| bench_autotune(&device));
    }
    println!("== stream ordering in use: {:?}", stream_ordering(&device));
    println!(
        "== {} checks, {} failed, {:.1} s",
        checks.count,
        checks.failures.len(),
        started.elapsed().as_secs_f64()
    );
    if checks.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &checks.failures {
            println!("  failed: {f}");
        }
        ExitCode::FAILURE
    }
}
