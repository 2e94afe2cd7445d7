//! `metrics.csv`: one row per optimizer step, appended as training goes (kept across resumes).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use fastlora_llama::ModelError;

use super::StepRecord;
use crate::error::Result;

const HEADER: &str = "step,loss,lr,grad_norm,tokens,tokens_per_s";

/// An open `metrics.csv`.
pub struct MetricsCsv {
    path: PathBuf,
    out: BufWriter<File>,
    failed: Option<std::io::Error>,
}

impl MetricsCsv {
    /// Creates the file for a fresh run (`resumed_at == 0`), or appends to it when resuming.
    ///
    /// # Errors
    /// The file cannot be created, naming it.
    pub fn open(path: &Path, resumed_at: usize) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ModelError::io("create", parent, e))?;
        }
        let fresh = resumed_at == 0 || !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(!fresh)
            .truncate(fresh)
            .open(path)
            .map_err(|e| ModelError::io("open", path, e))?;
        let mut out = BufWriter::new(file);
        let failed = if fresh {
            writeln!(out, "{HEADER}").err()
        } else {
            None
        };
        Ok(Self {
            path: path.to_path_buf(),
            out,
            failed,
        })
    }

    /// Adds a row; a write error is kept and reported by [`MetricsCsv::finish`].
    pub fn append(&mut self, r: &StepRecord, tokens_per_s: f64) {
        if self.failed.is_none() {
            // No norm (no clipping): an empty field.
            let grad_norm = r.grad_norm.map(|n| n.to_string()).unwrap_or_default();
            let row = writeln!(
                self.out,
                "{},{},{},{grad_norm},{},{:.1}",
                r.step, r.loss, r.lr, r.tokens, tokens_per_s
            );
            self.failed = row.err();
        }
    }

    /// Flushes the file.
    ///
    /// # Errors
    /// Any write error since opening, naming the file.
    pub fn finish(mut self) -> Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(ModelError::io("write", &self.path, e).into());
        }
        self.out
            .flush()
            .map_err(|e| ModelError::io("write", &self.path, e))?;
        Ok(())
    }
}
