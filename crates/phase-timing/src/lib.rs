//! Device-synced per-phase timing, process-wide: the fused MLP's forward and backward phases
//! (`mlp-bench` prints them), the model's blocks, the loss, and the checkpoint recompute
//! (`fastlora bench --profile`).
//!
//! Off by default, when a phase costs one atomic load. When on, every phase is bracketed by
//! device syncs, so the timings are exact per phase but their sum is slower than an unprofiled
//! run (no overlap between phases, one host round trip each): compare phases with each other
//! and with their FLOP or byte floor, not the sum with the unprofiled total.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, PhaseTotal>> = Mutex::new(BTreeMap::new());

/// The accumulated time of one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTotal {
    /// Wall time between the syncs around the phase, summed over calls.
    pub time: Duration,
    /// How many times the phase ran.
    pub calls: u32,
}

/// Turns phase timing on or off process-wide.
pub fn set_profiling(enabled: bool) {
    ENABLED.store(enabled, Ordering::SeqCst);
}

/// The totals since the last call, by phase name, and resets them.
pub fn take_totals() -> BTreeMap<&'static str, PhaseTotal> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `f` as phase `name` on `device`'s queue.
///
/// # Panics
/// If profiling is on and the device fails to sync.
pub fn phase<B: Backend, T>(name: &'static str, device: &B::Device, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    B::sync(device).expect("device sync before a profiled phase");
    let start = Instant::now();
    let out = f();
    B::sync(device).expect("device sync after a profiled phase");
    let elapsed = start.elapsed();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let total = totals.entry(name).or_default();
    total.time += elapsed;
    total.calls += 1;
    out
}
