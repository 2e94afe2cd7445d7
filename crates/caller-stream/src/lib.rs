//! Work on a helper thread, ordered as if the calling thread had issued it.
//!
//! CubeCL gives each host thread its own stream: a kernel issued by a helper thread would
//! otherwise run unordered with the caller's, and a read made there would not wait for the
//! caller's work. [`CallerStream::current`] captures the calling thread's stream and
//! [`CallerStream::run`] runs a closure with it as the current thread's stream, so what the
//! closure issues (kernels, reads) lands in the caller's queue, after everything issued there
//! before the capture. The checkpoint recompute and the trainer's loss read use it.
//!
//! Without the `cubecl` feature there is no stream to carry and `run` simply calls the closure.

/// The calling thread's CubeCL stream, to be run on from another thread.
#[derive(Debug, Clone, Copy)]
pub struct CallerStream {
    #[cfg(feature = "cubecl")]
    id: cubecl::stream_id::StreamId,
}

impl CallerStream {
    /// The stream of the calling thread.
    pub fn current() -> Self {
        Self {
            #[cfg(feature = "cubecl")]
            id: cubecl::stream_id::StreamId::current(),
        }
    }

    /// Runs `f` with this stream as the current thread's CubeCL stream (restored afterwards).
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        #[cfg(feature = "cubecl")]
        return self.id.executes(f);
        #[cfg(not(feature = "cubecl"))]
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closure runs, and its value comes back, whichever thread it runs on.
    #[test]
    fn runs_the_closure_on_a_helper_thread() {
        let stream = CallerStream::current();
        let got = std::thread::spawn(move || stream.run(|| 6 * 7))
            .join()
            .unwrap();
        assert_eq!(got, 42);
    }
}
