//! Row-major (Burn) to column-major (cuBLAS) operand mapping, without copies.
//!
//! Pure shape/stride arithmetic: no CUDA, so it is unit-tested on the CPU.
//!
//! cuBLAS is column-major. A row-major `[r, c]` matrix with row stride `ld` is, byte for byte, the
//! column-major `[c, r]` matrix (its transpose) with leading dimension `ld`. So the row-major
//! product `D = op(A)·op(B)` (`[M, N]`) is computed as the column-major product
//! `Dᵀ = op(B)ᵀ·op(A)ᵀ` (`[N, M]`): cuBLAS's "A" is our B, cuBLAS's "B" is our A, `m = N`,
//! `n = M`, and every operand is passed where it already lies. A transposed view (strides
//! `[1, ld]`, e.g. Burn's `transpose()`) is read in place by flipping its cuBLAS operation.

use std::fmt;

/// How a stored matrix's elements lie in memory (element strides, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// Element `(i, j)` at `i * ld + j`, `ld >= cols`.
    RowMajor { ld: usize },
    /// Element `(i, j)` at `i + j * ld`, `ld >= rows`.
    ColMajor { ld: usize },
}

/// Classifies the last two dimensions `[rows, cols]` with strides `[row_stride, col_stride]`.
///
/// Size-1 dimensions may carry any stride (Burn leaves them arbitrary). Returns `None` for layouts
/// cuBLAS cannot read in place (both strides non-unit, broadcast rows/columns with stride 0,
/// overlapping rows).
pub(crate) fn classify(
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Option<Storage> {
    let cols_unit = cols <= 1 || col_stride == 1;
    let row_ld = if rows <= 1 { cols.max(1) } else { row_stride };
    if cols_unit && row_ld >= cols.max(1) {
        return Some(Storage::RowMajor { ld: row_ld });
    }
    let rows_unit = rows <= 1 || row_stride == 1;
    let col_ld = if cols <= 1 { rows.max(1) } else { col_stride };
    if rows_unit && col_ld >= rows.max(1) {
        return Some(Storage::ColMajor { ld: col_ld });
    }
    None
}

/// One input matrix operand as the caller gave it: the last two dimensions of a rank-2 or rank-3
/// tensor, and whether the GEMM uses it transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Operand {
    /// Batch size (1 for a rank-2 tensor).
    pub batch: usize,
    /// Stored rows (the tensor's second-to-last dimension).
    pub rows: usize,
    /// Stored columns (the tensor's last dimension).
    pub cols: usize,
    /// Element stride between batch entries (ignored when `batch == 1`).
    pub batch_stride: usize,
    /// How the `[rows, cols]` matrix lies in memory.
    pub storage: Storage,
    /// Whether the GEMM uses the transpose of the stored matrix.
    pub trans: bool,
}

impl Operand {
    /// The GEMM's view `op(X)` as `[rows, cols]`.
    pub fn op_shape(&self) -> (usize, usize) {
        if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Number of elements from the first to one past the last element addressed.
    pub fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 || self.batch == 0 {
            return 0;
        }
        let last_in_matrix = match self.storage {
            Storage::RowMajor { ld } => (self.rows - 1) * ld + (self.cols - 1),
            Storage::ColMajor { ld } => (self.rows - 1) + (self.cols - 1) * ld,
        };
        let batch_stride = if self.batch > 1 { self.batch_stride } else { 0 };
        (self.batch - 1) * batch_stride + last_in_matrix + 1
    }

    /// The column-major description cuBLAS needs for `op(X)ᵀ` (see the module docs).
    fn to_cublas(self, batch_stride: usize) -> CublasMatrix {
        // The column-major view V of the stored matrix is Xᵀ for row-major storage, X for
        // column-major storage. We need op(X)ᵀ = trans ? X : Xᵀ, so cuBLAS's op on V is
        // "transpose" exactly when `trans` differs from "stored column-major".
        match self.storage {
            Storage::RowMajor { ld } => CublasMatrix {
                trans: self.trans,
                rows: self.cols,
                cols: self.rows,
                ld: ld.max(1),
                batch_stride,
            },
            Storage::ColMajor { ld } => CublasMatrix {
                trans: !self.trans,
                rows: self.rows,
                cols: self.cols,
                ld: ld.max(1),
                batch_stride,
            },
        }
    }
}

/// A matrix as handed to cuBLAS: column-major `[rows, cols]` with leading dimension `ld`, used
/// transposed when `trans`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CublasMatrix {
    pub trans: bool,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    /// Element stride between batch entries; 0 broadcasts one matrix over the batch.
    pub batch_stride: usize,
}

/// The accumulator C: row-major `[M, N]` per batch entry (row stride `ld`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Accumulator {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub batch_stride: usize,
}

/// A complete column-major GEMM: `D' = op(A')·op(B') (+ β C')`, `D'` column-major `[m, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Plan {
    /// cuBLAS's m: our N.
    pub m: usize,
    /// cuBLAS's n: our M.
    pub n: usize,
    /// The reduction dimension K.
    pub k: usize,
    /// Output batch size.
    pub batch: usize,
    /// cuBLAS's A: our B.
    pub a: CublasMatrix,
    /// cuBLAS's B: our A.
    pub b: CublasMatrix,
    /// cuBLAS's C (only meaningful with β): leading dimension and batch stride of our C.
    pub c_ld: usize,
    pub c_batch_stride: usize,
    /// Our output: contiguous `[batch, M, N]`, so ld = N and batch stride M·N.
    pub d_ld: usize,
    pub d_batch_stride: usize,
    /// Whether the output tensor is rank 3.
    pub batched_output: bool,
}

/// Why two operands cannot be multiplied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PlanError {
    /// `op(A)` is `[M, K]`, `op(B)` is `[K', N]` with `K != K'`.
    InnerDim {
        a: (usize, usize),
        b: (usize, usize),
    },
    /// Batch sizes that are neither equal nor 1.
    Batch {
        a: usize,
        b: usize,
        c: Option<usize>,
    },
    /// C is not `[M, N]` (per batch entry) of the output.
    Accumulator {
        c: (usize, usize, usize),
        expected: (usize, usize, usize),
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::InnerDim { a, b } => write!(
                f,
                "inner dimensions differ: op(A) is {}x{}, op(B) is {}x{}",
                a.0, a.1, b.0, b.1
            ),
            PlanError::Batch { a, b, c } => {
                write!(f, "batch sizes do not broadcast: A {a}, B {b}")?;
                if let Some(c) = c {
                    write!(f, ", C {c}")?;
                }
                Ok(())
            }
            PlanError::Accumulator { c, expected } => write!(
                f,
                "C is [{}, {}, {}] (batch, rows, cols), expected [{}, {}, {}]",
                c.0, c.1, c.2, expected.0, expected.1, expected.2
            ),
        }
    }
}

/// Plans `D = op(A)·op(B) (+ β C)` for row-major operands; see the module docs.
///
/// A batch of 1 broadcasts over the other operand's batch (stride 0). C, when given, must have the
/// output's batch size and `[M, N]`. When one B is shared by a batch of untransposed A whose rows
/// run on from one batch entry to the next (e.g. activations `[batch, seq, K]` times a weight),
/// the batch is folded into M: one GEMM with `M·batch` rows instead of a batched GEMM.
pub(crate) fn plan(
    a: &Operand,
    b: &Operand,
    c: Option<&Accumulator>,
    batched_output: bool,
) -> Result<Plan, PlanError> {
    let unfolded = plan_unfolded(a, b, c, batched_output)?;
    let a_rows_run_on = match a.storage {
        Storage::RowMajor { ld } => !a.trans && a.batch_stride == a.rows * ld,
        Storage::ColMajor { .. } => false,
    };
    let c_rows_run_on = c.is_none_or(|c| c.batch_stride == c.rows * c.ld.max(c.cols));
    if unfolded.batch > 1 && b.batch == 1 && a_rows_run_on && c_rows_run_on {
        let folded_a = Operand {
            batch: 1,
            rows: a.rows * a.batch,
            ..*a
        };
        let folded_c = c.map(|c| Accumulator {
            batch: 1,
            rows: c.rows * c.batch,
            ..*c
        });
        let mut folded = plan_unfolded(&folded_a, b, folded_c.as_ref(), batched_output)?;
        // D keeps its [batch, M, N] contiguous layout; only the per-entry stride is reported.
        folded.d_batch_stride = unfolded.d_batch_stride;
        return Ok(folded);
    }
    Ok(unfolded)
}

fn plan_unfolded(
    a: &Operand,
    b: &Operand,
    c: Option<&Accumulator>,
    batched_output: bool,
) -> Result<Plan, PlanError> {
    let (m, k_a) = a.op_shape();
    let (k_b, n) = b.op_shape();
    if k_a != k_b {
        return Err(PlanError::InnerDim {
            a: (m, k_a),
            b: (k_b, n),
        });
    }
    let batch = match (a.batch, b.batch) {
        (x, y) if x == y => x,
        (1, y) => y,
        (x, 1) => x,
        (x, y) => {
            return Err(PlanError::Batch {
                a: x,
                b: y,
                c: c.map(|c| c.batch),
            });
        }
    };
    let stride = |op: &Operand| if op.batch == 1 { 0 } else { op.batch_stride };
    let (c_ld, c_batch_stride) = match c {
        Some(c) => {
            if c.batch != batch || c.rows != m || c.cols != n {
                return Err(PlanError::Accumulator {
                    c: (c.batch, c.rows, c.cols),
                    expected: (batch, m, n),
                });
            }
            (
                c.ld.max(n).max(1),
                if batch == 1 { 0 } else { c.batch_stride },
            )
        }
        None => (n.max(1), m * n),
    };
    Ok(Plan {
        m: n,
        n: m,
        k: k_a,
        batch,
        a: b.to_cublas(stride(b)),
        b: a.to_cublas(stride(a)),
        c_ld,
        c_batch_stride,
        d_ld: n.max(1),
        d_batch_stride: m * n,
        batched_output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_major(rows: usize, cols: usize, trans: bool) -> Operand {
        Operand {
            batch: 1,
            rows,
            cols,
            batch_stride: rows * cols,
            storage: Storage::RowMajor { ld: cols },
            trans,
        }
    }

    /// Reference: evaluates a column-major cuBLAS matrix element `op(X)[i, j]` from a buffer.
    fn cublas_at(x: &CublasMatrix, buf: &[f64], batch: usize, i: usize, j: usize) -> f64 {
        let (r, c) = if x.trans { (j, i) } else { (i, j) };
        assert!(
            r < x.rows && c < x.cols,
            "({r},{c}) outside [{}, {}]",
            x.rows,
            x.cols
        );
        buf[batch * x.batch_stride + r + c * x.ld]
    }

    /// Runs a plan on the CPU with column-major semantics and returns row-major D.
    fn run(plan: &Plan, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut d = vec![0.0; plan.batch * plan.m * plan.n];
        for bt in 0..plan.batch {
            for i in 0..plan.m {
                for j in 0..plan.n {
                    let mut acc = 0.0;
                    for l in 0..plan.k {
                        // cuBLAS's A is our B buffer, cuBLAS's B our A buffer.
                        acc += cublas_at(&plan.a, b, bt, i, l) * cublas_at(&plan.b, a, bt, l, j);
                    }
                    d[bt * plan.d_batch_stride + i + j * plan.d_ld] = acc;
                }
            }
        }
        d
    }

    /// Row-major reference `op(A)·op(B)` for logical element access closures.
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut d = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                d[i * n + j] = (0..k).map(|l| a(i, l) * b(l, j)).sum();
            }
        }
        d
    }

    #[test]
    fn classify_layouts() {
        assert_eq!(classify(3, 4, 4, 1), Some(Storage::RowMajor { ld: 4 }));
        // Pitched rows (CubeCL's optimized layout).
        assert_eq!(classify(3, 4, 256, 1), Some(Storage::RowMajor { ld: 256 }));
        // A transposed view of a [4, 3] row-major tensor.
        assert_eq!(classify(3, 4, 1, 3), Some(Storage::ColMajor { ld: 3 }));
        // Size-1 dimensions with arbitrary strides.
        assert_eq!(classify(1, 4, 99, 1), Some(Storage::RowMajor { ld: 4 }));
        assert_eq!(classify(4, 1, 1, 99), Some(Storage::RowMajor { ld: 1 }));
        assert_eq!(classify(1, 4, 99, 7), Some(Storage::ColMajor { ld: 7 }));
        // Broadcast (stride 0) and strided-both layouts need a copy.
        assert_eq!(classify(3, 4, 0, 1), None);
        assert_eq!(classify(3, 4, 8, 2), None);
        // Overlapping rows.
        assert_eq!(classify(3, 4, 2, 1), None);
    }

    #[test]
    fn all_transpose_combinations_match_reference() {
        let (m, n, k) = (5, 3, 4);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let (ar, ac) = if trans_a { (k, m) } else { (m, k) };
                let (br, bc) = if trans_b { (n, k) } else { (k, n) };
                let a: Vec<f64> = (0..ar * ac).map(|x| (x as f64) * 0.5 - 3.0).collect();
                let b: Vec<f64> = (0..br * bc).map(|x| 1.0 + (x as f64) * 0.25).collect();
                let pa = row_major(ar, ac, trans_a);
                let pb = row_major(br, bc, trans_b);
                let p = plan(&pa, &pb, None, false).unwrap();
                assert_eq!((p.m, p.n, p.k), (n, m, k));
                let got = run(&p, &a, &b);
                let want = reference(
                    m,
                    n,
                    k,
                    |i, l| {
                        if trans_a {
                            a[l * ac + i]
                        } else {
                            a[i * ac + l]
                        }
                    },
                    |l, j| {
                        if trans_b {
                            b[j * bc + l]
                        } else {
                            b[l * bc + j]
                        }
                    },
                );
                assert_eq!(got, want, "trans_a={trans_a} trans_b={trans_b}");
            }
        }
    }

    #[test]
    fn column_major_view_flips_the_operation() {
        // A is logically [m, k] but stored as the transpose of a row-major [k, m] buffer.
        let (m, n, k) = (3, 2, 4);
        let buf: Vec<f64> = (0..k * m).map(|x| x as f64).collect(); // row-major [k, m]
        let a = Operand {
            batch: 1,
            rows: m,
            cols: k,
            batch_stride: 0,
            storage: classify(m, k, 1, m).unwrap(),
            trans: false,
        };
        let bbuf: Vec<f64> = (0..k * n).map(|x| 2.0 - x as f64).collect();
        let b = row_major(k, n, false);
        let p = plan(&a, &b, None, false).unwrap();
        let got = run(&p, &buf, &bbuf);
        let want = reference(m, n, k, |i, l| buf[l * m + i], |l, j| bbuf[l * n + j]);
        assert_eq!(got, want);
    }

    #[test]
    fn batched_with_broadcast_and_pitch() {
        let (bt, m, n, k) = (3, 2, 3, 2);
        let lda = 8; // pitched rows
        let bs = m * lda + 5; // batch entries not back to back: no folding
        let a = Operand {
            batch: bt,
            rows: m,
            cols: k,
            batch_stride: bs,
            storage: Storage::RowMajor { ld: lda },
            trans: false,
        };
        let abuf: Vec<f64> = (0..bt * bs).map(|x| (x % 7) as f64).collect();
        let b = row_major(n, k, true); // one [n, k] weight, used as wᵀ, broadcast over the batch
        let bbuf: Vec<f64> = (0..n * k).map(|x| x as f64 - 1.0).collect();
        let p = plan(&a, &b, None, true).unwrap();
        assert_eq!(p.batch, bt);
        assert_eq!(p.a.batch_stride, 0);
        let got = run(&p, &abuf, &bbuf);
        for t in 0..bt {
            let want = reference(
                m,
                n,
                k,
                |i, l| abuf[t * bs + i * lda + l],
                |l, j| bbuf[j * k + l],
            );
            assert_eq!(&got[t * m * n..(t + 1) * m * n], &want[..], "batch {t}");
        }
        // Back-to-back pitched entries fold into one GEMM with the same result.
        let folded = Operand {
            batch_stride: m * lda,
            ..a
        };
        let p = plan(&folded, &b, None, true).unwrap();
        assert_eq!((p.batch, p.n), (1, bt * m));
        let got = run(&p, &abuf, &bbuf);
        let want = reference(
            bt * m,
            n,
            k,
            |i, l| abuf[i * lda + l],
            |l, j| bbuf[j * k + l],
        );
        assert_eq!(got, want);
    }

    #[test]
    fn shared_weight_batch_folds_into_rows() {
        let (bt, m, n, k) = (3, 2, 4, 5);
        let a = Operand {
            batch: bt,
            rows: m,
            cols: k,
            batch_stride: m * k,
            storage: Storage::RowMajor { ld: k },
            trans: false,
        };
        let w = row_major(n, k, true);
        let p = plan(&a, &w, None, true).unwrap();
        assert_eq!((p.batch, p.m, p.n, p.k), (1, n, m * bt, k));
        let abuf: Vec<f64> = (0..bt * m * k).map(|x| (x % 5) as f64 - 2.0).collect();
        let wbuf: Vec<f64> = (0..n * k).map(|x| (x % 3) as f64).collect();
        let got = run(&p, &abuf, &wbuf);
        let want = reference(bt * m, n, k, |i, l| abuf[i * k + l], |l, j| wbuf[j * k + l]);
        assert_eq!(got, want);
        // A pitched batch (rows do not run on) stays batched.
        let pitched = Operand {
            batch_stride: m * k + 8,
            ..a
        };
        assert_eq!(plan(&pitched, &w, None, true).unwrap().batch, bt);
    }

    #[test]
    fn shape_errors() {
        let a = row_major(3, 4, false);
        let b = row_major(5, 2, false);
        assert!(matches!(
            plan(&a, &b, None, false),
            Err(PlanError::InnerDim { .. })
        ));
        let mut a2 = row_major(3, 4, false);
        a2.batch = 2;
        let mut b2 = row_major(4, 2, false);
        b2.batch = 3;
        assert!(matches!(
            plan(&a2, &b2, None, true),
            Err(PlanError::Batch { .. })
        ));
        let c = Accumulator {
            batch: 1,
            rows: 3,
            cols: 3,
            ld: 3,
            batch_stride: 0,
        };
        let b3 = row_major(4, 2, false);
        assert!(matches!(
            plan(&a, &b3, Some(&c), false),
            Err(PlanError::Accumulator { .. })
        ));
    }

    #[test]
    fn span_counts_last_element() {
        let op = Operand {
            batch: 2,
            rows: 3,
            cols: 4,
            batch_stride: 100,
            storage: Storage::RowMajor { ld: 10 },
            trans: false,
        };
        assert_eq!(op.span(), 100 + 2 * 10 + 3 + 1);
    }
}
