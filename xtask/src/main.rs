//! Developer tasks: `cargo xtask stage` builds the CUDA binary for the GPU machine;
//! `cargo xtask gpu-test` stages the GPU test binaries (see [`GPU_TESTS`]) with run scripts;
//! `cargo xtask bench` stages the end-to-end benchmark against the HF+PEFT and Unsloth peers.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// fastlora developer tasks.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build `fastlora` with `--features cuda` (release, stripped) into `stage/` with a run
    /// script, for carrying to the GPU machine (which has no Rust toolchain).
    Stage {
        /// Output folder (git-ignored).
        #[arg(long, default_value = "stage")]
        out: PathBuf,
    },
    /// Build the GPU test binaries (release, stripped) into `stage/gpu/` with one run script per
    /// binary and `run-all.sh`, for a CUDA machine without Rust: carry `stage/gpu` there and run
    /// `bash stage/gpu/run-all.sh` (or one `run-<name>.sh`): `gemm-check` (the cuBLAS GEMM
    /// provider: correctness, stream ordering, TFLOP/s), `gpu-matrix` (fused kernels against the
    /// portable path over dtype × rank × rsLoRA × targets × shapes), `mlp-bench` and its PyTorch
    /// peer (the fused LoRA MLP's time).
    GpuTest {
        /// Output folder (git-ignored).
        #[arg(long, default_value = "stage/gpu")]
        out: PathBuf,
    },
    /// Stage the end-to-end benchmark into `stage/bench/`: the CUDA `fastlora` (as `stage`
    /// does), `run-bench.sh` (each workload row: `fastlora bench`, then the peers on the same GPU
    /// in the same run) and the peer scripts from `--peers`. Carry `stage/bench` to the GPU
    /// machine and run `bash stage/bench/run-bench.sh`.
    Bench {
        /// Output folder (git-ignored).
        #[arg(long, default_value = "stage/bench")]
        out: PathBuf,
        /// Folder with the peer scripts (`peft_bench.py`, `unsloth_bench.py`).
        #[arg(long, default_value = "../shared/peers")]
        peers: PathBuf,
        /// Folder with Unsloth's wheels and `bnb.tgz` (from the peers' `fetch_wheels.sh`), staged
        /// as `wheels/` so the run installs them; without it the Unsloth peer is skipped.
        #[arg(long)]
        unsloth_wheels: Option<PathBuf>,
        /// Reuse the binary a previous `stage` built instead of building again.
        #[arg(long)]
        no_build: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Stage { out } => stage(&out),
        Task::GpuTest { out } => gpu_test(&out),
        Task::Bench {
            out,
            peers,
            unsloth_wheels,
            no_build,
        } => bench(&out, &peers, unsloth_wheels.as_deref(), no_build),
    }
}

/// One binary of the GPU test matrix.
struct GpuTestBinary {
    package: &'static str,
    features: &'static str,
    bin: &'static str,
    /// Arguments the run script passes before the caller's.
    args: &'static str,
}

/// The GPU test matrix: binaries built by `cargo xtask gpu-test`, run in this order by
/// `run-all.sh`.
const GPU_TESTS: &[GpuTestBinary] = &[
    GpuTestBinary {
        package: "fastlora-cuda-gemm",
        // Not `burn-autotune`: with one feature set for all binaries it would autotune every
        // matmul shape of the matrix too (minutes); Burn's default strategy is the baseline.
        features: "cuda",
        bin: "gemm-check",
        args: "",
    },
    GpuTestBinary {
        package: "fastlora",
        features: "cuda",
        bin: "gpu-matrix",
        args: "",
    },
    GpuTestBinary {
        package: "fused-mlp",
        features: "cuda",
        bin: "mlp-bench",
        args: "",
    },
    GpuTestBinary {
        package: "flash-attention",
        features: "cuda",
        bin: "attention-bench",
        // No argument: every mode runs; `run-attention-bench.sh MODE` runs one.
        args: "",
    },
    GpuTestBinary {
        package: "fastlora",
        features: "cuda",
        bin: "ce-bench",
        args: "",
    },
    GpuTestBinary {
        package: "fused-adamw",
        features: "cuda",
        bin: "adamw-check",
        args: "",
    },
];

/// The PyTorch peers staged beside the binaries (`run-all.sh` runs them after the binaries
/// when `python3` has torch).
const PEERS: &[&str] = &[
    "xtask/peers/lora_mlp_torch.py",
    "kernels-cubecl/flash-attention/scripts/attention_peer.py",
    "xtask/peers/ce_peer.py",
];

/// Puts the CUDA 13 libraries the binaries load at run time (driver, NVRTC for CubeCL's kernels,
/// cuBLAS, cuBLASLt) on the loader path when pip's `nvidia-*` packages hold them, and unpacks
/// the xz-compressed binaries (compressed so the staged folder stays far below the GPU
/// machine's 64 MiB carry limit) into a temporary folder.
const RUN_PREAMBLE: &str = r#"#!/usr/bin/env bash
# Staged by `cargo xtask stage` or `cargo xtask gpu-test`; runs on a CUDA machine without Rust.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvidia_libs="$(python3 -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))' 2>/dev/null || true)"
[ -n "$nvidia_libs" ] && export LD_LIBRARY_PATH="$nvidia_libs:${LD_LIBRARY_PATH:-}"
bin_dir="${TMPDIR:-/tmp}/fastlora-gpu"
mkdir -p "$bin_dir"
unpack() {
  if [ ! -x "$bin_dir/$1" ] || [ "$here/$1.xz" -nt "$bin_dir/$1" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$here/$1.xz" "$bin_dir/$1"
    chmod +x "$bin_dir/$1"
  fi
  echo "$bin_dir/$1"
}
"#;

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn gpu_test(out: &Path) -> Result<()> {
    let root = workspace_root()?;
    let out = root.join(out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut all = String::from(RUN_PREAMBLE);
    all.push_str("status=0\n");
    // One cargo invocation, so the packages share one feature set (one build of Burn) instead
    // of rebuilding it per package.
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(root).args(["build", "--release"]);
    let mut features = Vec::new();
    for test in GPU_TESTS {
        build.args(["-p", test.package, "--bin", test.bin]);
        features.extend(
            test.features
                .split(',')
                .map(|f| format!("{}/{f}", test.package)),
        );
    }
    build.args(["--features", &features.join(",")]);
    let status = build.status().context("running cargo build")?;
    if !status.success() {
        bail!(
            "cargo build of the GPU test binaries failed ({})",
            features.join(",")
        );
    }
    for test in GPU_TESTS {
        let args = if test.args.is_empty() {
            String::new()
        } else {
            format!(" {}", test.args)
        };
        let script = out.join(format!("run-{}.sh", test.bin));
        stage_binary(root, &out, test.bin, &script, &args)?;
        all.push_str(&format!(
            "echo \"### {bin}\"; \"$(unpack {bin})\"{args} || status=1\n",
            bin = test.bin,
        ));
    }
    for peer in PEERS {
        let from = root.join(peer);
        let name = from.file_name().context("a peer script has a file name")?;
        std::fs::copy(&from, out.join(name))
            .with_context(|| format!("copying {}", from.display()))?;
        all.push_str(&format!(
            "echo \"### {name}\"; python3 \"$here/{name}\" || status=1\n",
            name = name.to_string_lossy()
        ));
    }
    all.push_str("exit $status\n");
    let script = out.join("run-all.sh");
    std::fs::write(&script, all).with_context(|| format!("writing {}", script.display()))?;
    println!("staged {}", script.display());
    Ok(())
}

/// Copies the built `bin` into `out`, strips and xz-compresses it, and writes `script`, which
/// unpacks and runs it with `args` (see [`RUN_PREAMBLE`]).
fn stage_binary(root: &Path, out: &Path, bin: &str, script: &Path, args: &str) -> Result<()> {
    let binary = out.join(bin);
    let built = target_dir(root).join("release").join(bin);
    // Replace rather than overwrite: a staged copy may be read-only.
    let _ = std::fs::remove_file(&binary);
    std::fs::copy(&built, &binary)
        .with_context(|| format!("copying {} to {}", built.display(), binary.display()))?;
    strip(&binary)?;
    let xz = Command::new("xz")
        .args(["-f", "-6", "-T2"])
        .arg(&binary)
        .status()
        .context("running xz")?;
    if !xz.success() {
        bail!("xz {} failed", binary.display());
    }
    std::fs::write(
        script,
        format!("{RUN_PREAMBLE}exec \"$(unpack {bin})\"{args} \"$@\"\n"),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    let size = std::fs::metadata(out.join(format!("{bin}.xz")))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "staged {}.xz ({:.1} MiB) and {}",
        binary.display(),
        size as f64 / (1 << 20) as f64,
        script.display()
    );
    Ok(())
}

fn workspace_root() -> Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask sits in the workspace")
}

fn build_cuda_cli(root: &Path) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["build", "--release", "-p", "fastlora", "--features", "cuda"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --features cuda failed");
    }
    Ok(())
}

fn stage(out: &Path) -> Result<()> {
    let root = workspace_root()?;
    build_cuda_cli(root)?;
    let out = root.join(out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    stage_binary(root, &out, "fastlora", &out.join("run.sh"), "")
}

fn bench(out: &Path, peers: &Path, unsloth_wheels: Option<&Path>, no_build: bool) -> Result<()> {
    let root = workspace_root()?;
    if !no_build {
        build_cuda_cli(root)?;
    }
    let out = root.join(out);
    std::fs::create_dir_all(out.join("peers"))
        .with_context(|| format!("creating {}", out.display()))?;
    stage_binary(root, &out, "fastlora", &out.join("run.sh"), "")?;
    // The run script, and the CUPTI timeline tools (`trace.sh`: where a step's device time goes).
    for name in ["run-bench.sh", "trace.sh", "cupti_trace.c", "timeline.py"] {
        let from = root.join("xtask/bench").join(name);
        std::fs::copy(&from, out.join(name))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    let peers = root.join(peers);
    for name in ["peft_bench.py", "unsloth_bench.py"] {
        let from = peers.join(name);
        std::fs::copy(&from, out.join("peers").join(name)).with_context(|| {
            format!(
                "copying the peer script {} (pass --peers DIR)",
                from.display()
            )
        })?;
    }
    if let Some(wheels) = unsloth_wheels {
        let dest = out.join("wheels");
        std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
        for entry in
            std::fs::read_dir(wheels).with_context(|| format!("reading {}", wheels.display()))?
        {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, dest.join(name))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
    }
    println!("staged {}", out.join("run-bench.sh").display());
    Ok(())
}

/// Strips `binary`'s symbols: the GPU machine gets at most 64 MiB a call.
fn strip(binary: &Path) -> Result<()> {
    let status = Command::new("strip")
        .arg(binary)
        .status()
        .context("running strip")?;
    if !status.success() {
        bail!("strip {} failed", binary.display());
    }
    Ok(())
}
