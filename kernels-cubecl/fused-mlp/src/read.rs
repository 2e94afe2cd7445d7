//! Reading values back without stalling the device.
//!
//! A read waits for every kernel issued before it. A trainer that reads the loss between the
//! backward and the optimizer leaves the device idle while the host then prepares the optimizer
//! step. [`start_read`] makes the read on a helper thread, on the calling thread's CubeCL stream
//! so that it is ordered after the work already issued there, while the calling thread goes on
//! issuing work; [`PendingRead::finish`] collects the values.

use std::thread::{self, JoinHandle};

use burn::prelude::*;
use burn::tensor::TensorData;
use caller_stream::CallerStream;

/// A tensor's values on their way to the host (see [`start_read`]).
pub struct PendingRead {
    reader: JoinHandle<TensorData>,
}

/// Starts reading `tensor`'s values on a helper thread (on the CubeCL backends, on the calling
/// thread's stream: the read comes after every kernel issued so far, and later kernels are not
/// held up by it).
///
/// # Panics
/// If the helper thread cannot be started.
pub fn start_read<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> PendingRead {
    let stream = CallerStream::current();
    let reader = thread::Builder::new()
        .name("read-back".into())
        .spawn(move || stream.run(|| tensor.into_data()))
        .expect("cannot start the read-back thread");
    PendingRead { reader }
}

impl PendingRead {
    /// Waits for the values.
    ///
    /// # Panics
    /// If the read failed (the device failed computing or copying them), as Burn's `into_data`
    /// does.
    pub fn finish(self) -> TensorData {
        self.reader
            .join()
            .unwrap_or_else(|_| panic!("reading a tensor back failed (see the panic above)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// A sum that only exists once the device has run the reduction issued just before the
    /// read, and whose value a read narrowed to bf16 would move by ≈ 1e-3 relative (f32 summation
    /// order moves it by well under 1e-5).
    fn check<B: Backend>(device: &B::Device) {
        let terms: Vec<f32> = (0..10_000).map(|i| 1.0 + i as f32 * 1e-4).collect();
        let want: f64 = terms.iter().map(|&t| f64::from(t)).sum();
        let x = Tensor::<B, 1>::from_floats(terms.as_slice(), device);
        let pending = start_read(x.sum());
        let got = pending.finish().to_vec::<f32>().unwrap();
        assert_eq!(got.len(), 1);
        let got = f64::from(got[0]);
        assert!(
            (got - want).abs() <= want * 1e-6,
            "read {got} against {want}"
        );
    }

    #[test]
    fn reads_what_was_issued_before_on_ndarray() {
        check::<NdArray<f32>>(&Default::default());
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn reads_what_was_issued_before_on_wgpu() {
        if let Some(device) = crate::vulkan_test_device() {
            check::<crate::WgpuBackend<f32>>(&device);
        }
    }
}
