//! The recomputing autodiff op on a concrete `Autodiff<I, C>`.
//!
//! Forward: the layer runs on untracked copies of its input and parameters (same buffers, fresh
//! graph nodes that require no grad), so none of its operations records a backward step or keeps
//! an activation. One graph node stands for the whole layer; it keeps the layer input (on the
//! device, or as host data) and the untracked layer copy.
//!
//! Backward: the step recomputes the layer on fresh leaves that require grad and back-propagates
//! the incoming gradient through that second graph. Burn 0.21 cannot run that nested backward on
//! the thread of the outer one: the outer `backward()` holds its graph's mutex while it runs the
//! steps, and every `backward()` ends by locking every graph to free orphans, so a nested call
//! deadlocks. The nested forward and backward therefore run on a helper thread, and its gradients
//! come back through the channel of a [`Tap`] op placed on each leaf, which sends the gradient it
//! receives as soon as its own step runs. The outer step registers them and returns; the helper
//! then waits, holding no lock, until the outer backward releases its graph, and ends.
//!
//! The helper thread issues its device work on the outer thread's CubeCL stream. CubeCL gives
//! every new thread a stream of its own, with its own memory pools: a fresh thread per layer
//! per step would create a CUDA stream and pools each time, and memory the main stream had
//! reserved in forward would be unavailable to it (on a nearly full GPU, creating the stream
//! fails with out-of-memory). The outer thread only waits while the helper runs, so the two
//! never interleave work on the shared stream out of order.

use std::fmt;
use std::marker::PhantomData;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{TensorData, TensorMetadata, TensorPrimitive};
use caller_stream::CallerStream;

use crate::dispatch::cast;

type Ad<I, C> = Autodiff<I, C>;

/// Which gradient a [`Tap`] message carries: the layer input's, or that of the k-th trainable
/// parameter (in `Module::map` order).
#[derive(Debug, Clone, Copy)]
enum Slot {
    Input,
    Param(usize),
}

/// A gradient sent by a [`Tap`]; `None` when nothing flowed into its leaf.
type Message<I> = (Slot, Option<FloatTensor<I>>);

/// Runs `forward(layer, input)` as one recomputing graph node (see the module docs).
///
/// `seed` is the backend seed set just before this call; the recompute sets it again, so RNG
/// draws inside the layer (dropout masks) repeat. `offload` keeps the input as host data.
///
/// # Panics
/// If the untracked forward still produces a tracked output: `forward` then captures a tensor
/// that requires grad, which it must take through `layer` instead.
pub(crate) fn checkpointed<B, I, C, M, F, const D: usize>(
    offload: bool,
    input: Tensor<B, D>,
    layer: &M,
    forward: F,
    seed: u64,
) -> Tensor<B, D>
where
    B: Backend,
    I: Backend,
    C: CheckpointStrategy,
    M: Module<B> + 'static,
    F: Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Send + 'static,
{
    let x = to_graph::<B, I, C, D>(input);
    let mut detach = Detach::<I, C> {
        params: Vec::new(),
        first_tracked: None,
    };
    let frozen = layer.clone().map(&mut detach);
    let free_x = from_graph::<B, I, C, D>(Ad::<I, C>::from_inner(x.primitive.clone()));
    let y = to_graph::<B, I, C, D>(forward(&frozen, free_x));
    assert!(
        !y.is_tracked(),
        "checkpoint: the layer's output requires grad although its input and parameters were \
         detached; the forward closure captures a tensor that requires grad (pass it through \
         the layer module instead)"
    );
    let anchor = match detach.first_tracked {
        Some(param) => param,
        None if x.is_tracked() => x.clone(),
        // Nothing in the layer needs a gradient: there is nothing to recompute.
        None => return from_graph::<B, I, C, D>(y),
    };
    let step = Recompute::<B, I, C, M, F, D> {
        layer: frozen,
        forward,
        saved: Saved::new::<D>(x.primitive.clone(), offload),
        params: detach.params,
        seed,
        types: PhantomData,
    };
    // The second parent only makes the node tracked when the input is not (the first layer
    // reads frozen embeddings); the step registers every parameter's gradient by its node id.
    let prep = <Recompute<B, I, C, M, F, D> as Backward<I, 2>>::prepare::<C>(
        step,
        [x.node.clone(), anchor.node.clone()],
    )
    .compute_bound()
    .stateful();
    match prep {
        OpsKind::Tracked(prep) => from_graph::<B, I, C, D>(prep.finish((), y.primitive)),
        OpsKind::UnTracked(_) => unreachable!("a parent requires grad"),
    }
}

/// `B`'s tensor as the autodiff primitive of `Autodiff<I, C>`, which the caller has checked is
/// `B`.
fn to_graph<B: Backend, I: Backend, C: CheckpointStrategy, const D: usize>(
    tensor: Tensor<B, D>,
) -> FloatTensor<Ad<I, C>> {
    cast::<Tensor<B, D>, Tensor<Ad<I, C>, D>>(tensor)
        .into_primitive()
        .tensor()
}

/// The inverse of [`to_graph`].
fn from_graph<B: Backend, I: Backend, C: CheckpointStrategy, const D: usize>(
    tensor: FloatTensor<Ad<I, C>>,
) -> Tensor<B, D> {
    cast::<Tensor<Ad<I, C>, D>, Tensor<B, D>>(Tensor::from_primitive(TensorPrimitive::Float(
        tensor,
    )))
}

/// Replaces every float parameter by an untracked tensor on the same buffer, and notes which
/// ones required grad.
struct Detach<I: Backend, C: CheckpointStrategy> {
    /// Per parameter in `Module::map` order: its node id if it required grad.
    params: Vec<Option<NodeId>>,
    /// The first parameter that required grad, as it was.
    first_tracked: Option<FloatTensor<Ad<I, C>>>,
}

impl<B: Backend, I: Backend, C: CheckpointStrategy> ModuleMapper<B> for Detach<I, C> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = to_graph::<B, I, C, D>(tensor);
        let tracked = tensor.is_tracked();
        self.params.push(tracked.then_some(tensor.node.id));
        let free = Ad::<I, C>::from_inner(tensor.primitive.clone());
        if tracked && self.first_tracked.is_none() {
            self.first_tracked = Some(tensor);
        }
        Param::from_mapped_value(id, from_graph::<B, I, C, D>(free), mapper)
    }
}

/// Puts a [`Tap`]ped fresh leaf in place of every parameter that required grad in the original
/// layer (the untracked copy's parameters come in the same order).
struct Retrack<'a, I: Backend, C: CheckpointStrategy> {
    params: &'a [Option<NodeId>],
    next: usize,
    taps: Vec<FloatTensor<Ad<I, C>>>,
    tx: &'a Sender<Message<I>>,
}

impl<B: Backend, I: Backend, C: CheckpointStrategy> ModuleMapper<B> for Retrack<'_, I, C> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let index = self.next;
        self.next += 1;
        if self.params[index].is_none() {
            return param;
        }
        let slot = Slot::Param(self.taps.len());
        let (id, tensor, mapper) = param.consume();
        let leaf = Ad::<I, C>::from_inner(to_graph::<B, I, C, D>(tensor).primitive).require_grad();
        let tapped = tap::<I, C>(leaf, slot, self.tx);
        self.taps.push(tapped.clone());
        Param::from_mapped_value(id, from_graph::<B, I, C, D>(tapped), mapper)
    }
}

/// The layer input kept for the recompute.
enum Saved<I: Backend> {
    /// On the device.
    Device(FloatTensor<I>),
    /// Read back to host memory (pinned where the runtime stages it), the device copy freed.
    Host { data: TensorData, device: I::Device },
    /// On CUDA: in pinned host memory, copied on a copy stream beside the compute stream (the
    /// copy may still be in flight; the device copy is freed once it is done).
    #[cfg(feature = "cuda")]
    Pinned {
        copy: fastlora_cuda_gemm::HostCopy,
        device: I::Device,
    },
}

/// Whether `I`'s float tensors are Burn's CUDA tensors, which [`Saved::Pinned`] copies.
#[cfg(feature = "cuda")]
fn is_cuda<I: Backend>() -> bool {
    std::any::TypeId::of::<FloatTensor<I>>()
        == std::any::TypeId::of::<fastlora_cuda_gemm::CudaTensor>()
}

impl<I: Backend> Saved<I> {
    /// Keeps `x`, copied to the host when `offload` and `x` holds at least
    /// [`crate::OFFLOAD_MIN_BYTES`]: asynchronously on CUDA ([`Saved::Pinned`]), elsewhere a
    /// read that blocks until `x` is computed.
    fn new<const D: usize>(x: FloatTensor<I>, offload: bool) -> Self {
        let bytes = x.shape().num_elements() * x.dtype().size();
        if !offload || bytes < crate::OFFLOAD_MIN_BYTES {
            return Self::Device(x);
        }
        let device = I::float_device(&x);
        phase_timing::phase::<I, _>("checkpoint offload (device → host)", &device, || {
            #[cfg(feature = "cuda")]
            if is_cuda::<I>() {
                let copy = fastlora_cuda_gemm::copy_to_host(cast(x))
                    .unwrap_or_else(|e| panic!("checkpoint: offloading a layer input: {e}"));
                return Self::Pinned {
                    copy,
                    device: device.clone(),
                };
            }
            let mut data = Tensor::<I, D>::from_primitive(TensorPrimitive::Float(x)).into_data();
            I::staging(std::iter::once(&mut data), &device);
            Self::Host {
                data,
                device: device.clone(),
            }
        })
    }

    /// The input on its device again. On CUDA this also starts bringing back the newest input
    /// still in host memory: backward visits layers in reverse, so that is the next layer's,
    /// and its copy overlaps this layer's recompute and backward.
    fn restore(self) -> FloatTensor<I> {
        match self {
            Self::Device(x) => {
                // The last layer keeps its input on the device; the layer before it was
                // offloaded (`copy_to_device` starts the prefetch itself for offloaded inputs).
                #[cfg(feature = "cuda")]
                if is_cuda::<I>() {
                    fastlora_cuda_gemm::prefetch_latest_offload().unwrap_or_else(|e| {
                        panic!("checkpoint: prefetching an offloaded layer input: {e}")
                    });
                }
                x
            }
            Self::Host { data, device } => {
                phase_timing::phase::<I, _>("checkpoint restore (host → device)", &device, || {
                    I::float_from_data(data, &device)
                })
            }
            #[cfg(feature = "cuda")]
            Self::Pinned { copy, device } => {
                phase_timing::phase::<I, _>("checkpoint restore (host → device)", &device, || {
                    cast(
                        fastlora_cuda_gemm::copy_to_device(copy).unwrap_or_else(|e| {
                            panic!("checkpoint: bringing a layer input back: {e}")
                        }),
                    )
                })
            }
        }
    }
}

/// The graph node of one checkpointed layer call. Parents: the input, and an anchor (see
/// [`checkpointed`]).
struct Recompute<B, I: Backend, C, M, F, const D: usize> {
    /// The layer with untracked parameters.
    layer: M,
    forward: F,
    saved: Saved<I>,
    /// Per parameter of `layer`: the node id of the original if it required grad.
    params: Vec<Option<NodeId>>,
    seed: u64,
    types: PhantomData<fn() -> (B, C)>,
}

impl<B, I: Backend, C, M, F, const D: usize> fmt::Debug for Recompute<B, I, C, M, F, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recompute")
            .field("trainable_params", &self.params.iter().flatten().count())
            .field("offloaded", &!matches!(self.saved, Saved::Device(_)))
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl<B, I, C, M, F, const D: usize> Backward<I, 2> for Recompute<B, I, C, M, F, D>
where
    B: Backend,
    I: Backend,
    C: CheckpointStrategy,
    M: Module<B> + 'static,
    F: Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Send + 'static,
{
    type State = ();

    fn backward(self, ops: Ops<(), 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_y = grads.consume::<I>(&ops.node);
        let device = I::float_device(&grad_y);
        // Profiled as a whole: the nested backward cannot be timed on the helper thread, which
        // stays blocked until the outer backward ends (see the module docs). The recompute's
        // model blocks and the restore are profiled inside; the rest is the layer's backward.
        phase_timing::phase::<I, _>(
            "checkpoint node (restore + recompute + layer backward)",
            &device,
            || self.backward_layer(ops, grad_y, grads),
        );
    }
}

impl<B, I, C, M, F, const D: usize> Recompute<B, I, C, M, F, D>
where
    B: Backend,
    I: Backend,
    C: CheckpointStrategy,
    M: Module<B> + 'static,
    F: Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Send + 'static,
{
    /// The backward step: recomputes the layer on a helper thread, back-propagates `grad_y`
    /// through it there, and registers the gradients it sends back.
    fn backward_layer(self, ops: Ops<(), 2>, grad_y: FloatTensor<I>, grads: &mut Gradients) {
        let [input, _anchor] = ops.parents;
        let params: Vec<NodeId> = self.params.iter().flatten().copied().collect();
        let (tx, rx) = mpsc::channel();
        let stream = CallerStream::current();
        let helper = thread::Builder::new()
            .name("checkpoint-recompute".into())
            .spawn(move || stream.run(|| self.recompute(grad_y, tx)))
            .expect("checkpoint: cannot start the recompute thread");
        let mut grad_input = None;
        let mut grad_params: Vec<_> = params.iter().map(|_| None).collect();
        for _ in 0..=params.len() {
            match receive::<I>(&rx, &helper) {
                (Slot::Input, grad) => grad_input = grad,
                (Slot::Param(k), grad) => grad_params[k] = grad,
            }
        }
        if let (Some(node), Some(grad)) = (input, grad_input) {
            grads.register::<I>(node.id, grad);
        }
        for (id, grad) in params.into_iter().zip(grad_params) {
            if let Some(grad) = grad {
                grads.register::<I>(id, grad);
            }
        }
    }

    /// On the helper thread: recomputes the layer on tapped fresh leaves and back-propagates
    /// `grad_y` through it; the taps send the leaves' gradients on `tx`.
    fn recompute(self, grad_y: FloatTensor<I>, tx: Sender<Message<I>>) {
        let x = self.saved.restore();
        let device = I::float_device(&x);
        let x = tap::<I, C>(Ad::<I, C>::from_inner(x).require_grad(), Slot::Input, &tx);
        let mut retrack = Retrack::<I, C> {
            params: &self.params,
            next: 0,
            taps: Vec::new(),
            tx: &tx,
        };
        let layer = self.layer.map(&mut retrack);
        let taps = retrack.taps;
        Ad::<I, C>::seed(&device, self.seed);
        let y = crate::as_recompute(|| (self.forward)(&layer, from_graph::<B, I, C, D>(x.clone())));
        let y = to_graph::<B, I, C, D>(y);
        drop(layer);
        // The root starts the incoming gradient at the output and makes every tap reachable, so
        // each one runs (and sends) even when its leaf got no gradient.
        let mut root = join::<I, C>(&y, &x, Some(grad_y));
        for tapped in &taps {
            root = join::<I, C>(&root, tapped, None);
        }
        drop((x, y, taps, tx));
        Ad::<I, C>::backward(root);
    }
}

/// The next gradient from the helper thread.
///
/// # Panics
/// If the helper thread ended without sending it (it panicked: its message is printed above).
fn receive<I: Backend>(rx: &Receiver<Message<I>>, helper: &JoinHandle<()>) -> Message<I> {
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(message) => return message,
            // The helper keeps running (blocked) until this backward ends, so a finished helper
            // is a failed one.
            Err(RecvTimeoutError::Timeout) if !helper.is_finished() => continue,
            Err(_) => panic!(
                "checkpoint: recomputing a checkpointed layer failed (see the panic of thread \
                 `checkpoint-recompute`)"
            ),
        }
    }
}

/// Identity op whose backward step sends the gradient its output received.
#[derive(Debug)]
struct Tap;

impl<I: Backend> Backward<I, 1> for Tap {
    /// The slot, the channel, and a buffer to build the lookup handle from.
    type State = (Slot, Sender<Message<I>>, FloatTensor<I>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (slot, tx, buffer) = ops.state;
        // `Gradients` is keyed by node but only looked up through a tensor: a handle that
        // carries this node finds the gradient without `consume`'s panic when none arrived.
        let mut handle = Autodiff::<I>::from_inner(buffer);
        handle.node = ops.node;
        // The receiver is gone only if the outer step already panicked.
        let _ = tx.send((slot, grads.remove::<I>(&handle)));
    }
}

/// `leaf` through a [`Tap`] reporting on `tx` as `slot`.
fn tap<I: Backend, C: CheckpointStrategy>(
    leaf: FloatTensor<Ad<I, C>>,
    slot: Slot,
    tx: &Sender<Message<I>>,
) -> FloatTensor<Ad<I, C>> {
    let prep = <Tap as Backward<I, 1>>::prepare::<C>(Tap, [leaf.node.clone()])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let buffer = leaf.primitive.clone();
            prep.finish((slot, tx.clone(), buffer), leaf.primitive)
        }
        OpsKind::UnTracked(_) => unreachable!("taps sit on leaves that require grad"),
    }
}

/// Graph glue with a one-element output: its step registers `grad` (if any) for `lhs` and
/// nothing for `rhs`, which is a parent only to be reached by the backward pass.
#[derive(Debug)]
struct Join;

impl<I: Backend> Backward<I, 2> for Join {
    type State = Option<FloatTensor<I>>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        if let ([Some(lhs), _], Some(grad)) = (ops.parents, ops.state) {
            grads.register::<I>(lhs.id, grad);
        }
    }
}

/// See [`Join`].
fn join<I: Backend, C: CheckpointStrategy>(
    lhs: &FloatTensor<Ad<I, C>>,
    rhs: &FloatTensor<Ad<I, C>>,
    grad: Option<FloatTensor<I>>,
) -> FloatTensor<Ad<I, C>> {
    let device = I::float_device(&lhs.primitive);
    // Nothing reads the glue's value (its backward ignores its incoming gradient): an unfilled
    // buffer spares a fill kernel per joined leaf, sixteen per Llama layer.
    let out = I::float_empty([1].into(), &device, lhs.primitive.dtype().into());
    let prep = <Join as Backward<I, 2>>::prepare::<C>(Join, [lhs.node.clone(), rhs.node.clone()])
        .compute_bound()
        .stateful();
    match prep {
        OpsKind::Tracked(prep) => prep.finish(grad, out),
        OpsKind::UnTracked(_) => unreachable!("`rhs` is a tap, which is tracked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn host_offload_round_trip_is_exact() {
        type I = NdArray<f32>;
        let device = Default::default();
        // Just large enough to be offloaded, with values a lossy copy would change.
        let n = crate::OFFLOAD_MIN_BYTES / 4;
        let values: Vec<f32> = (0..n)
            .map(|i| match i % 3 {
                0 => 1.5 + i as f32,
                1 => -0.0,
                _ => f32::MIN_POSITIVE,
            })
            .collect();
        let x = Tensor::<I, 1>::from_floats(values.as_slice(), &device).reshape([1, 1, n]);
        let expected = x.to_data();
        let saved = Saved::<I>::new::<3>(x.into_primitive().tensor(), true);
        assert!(matches!(saved, Saved::Host { .. }));
        let back = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(saved.restore()));
        assert_eq!(back.into_data(), expected);
    }

    #[test]
    fn inputs_below_the_threshold_stay_on_the_device() {
        type I = NdArray<f32>;
        let x = Tensor::<I, 1>::zeros([crate::OFFLOAD_MIN_BYTES / 4 - 1], &Default::default());
        let saved = Saved::<I>::new::<1>(x.into_primitive().tensor(), true);
        assert!(matches!(saved, Saved::Device(_)));
    }
}
