//! Developer tasks: `cargo xtask stage` builds the CUDA binary for the GPU machine.

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
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Stage { out } => stage(&out),
    }
}

fn stage(out: &Path) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask sits in the workspace")?;
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["build", "--release", "-p", "fastlora", "--features", "cuda"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --features cuda failed");
    }
    let out = root.join(out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let binary = out.join("fastlora");
    std::fs::copy(root.join("target/release/fastlora"), &binary).context("copying the binary")?;
    let strip = Command::new("strip")
        .arg(&binary)
        .status()
        .context("running strip")?;
    if !strip.success() {
        bail!("strip {} failed", binary.display());
    }
    let script = out.join("run.sh");
    std::fs::write(
        &script,
        "#!/usr/bin/env bash\n# Runs the staged fastlora binary from the repo root on the GPU machine.\nset -euo pipefail\nexec \"$(dirname \"$0\")/fastlora\" \"$@\"\n",
    )
    .context("writing run.sh")?;
    println!("staged {} and {}", binary.display(), script.display());
    Ok(())
}
