//! Checkpointed layers against the same layers run plainly: a stack of small LoRA blocks on
//! `Autodiff<NdArray<f32>>`, gradients compared bit for bit.

use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, TensorPrimitive};
use checkpointing::{CheckpointMode, checkpoint, is_supported, seed_layers};
use lora_layers::{LoraAdapterConfig, LoraInit, LoraLinear, LoraLinearConfig};

type Inner = NdArray<f32>;
type B = Autodiff<Inner>;

/// The backend RNG and the layer-seed stream are process state: tests that draw must not overlap.
static RNG: Mutex<()> = Mutex::new(());

const MODES: [CheckpointMode; 3] = [
    CheckpointMode::Off,
    CheckpointMode::Recompute,
    CheckpointMode::HostOffload,
];

/// `x + down(silu(up(x · gain)))`: two LoRA projections (frozen bases) and a trainable gain.
#[derive(Module, Debug)]
struct Block<B: Backend> {
    gain: Param<Tensor<B, 1>>,
    up: LoraLinear<B>,
    down: LoraLinear<B>,
}

impl<B: Backend> Block<B> {
    fn new(hidden: usize, inner: usize, dropout: f64, seed: u64, device: &B::Device) -> Self {
        let adapter = LoraAdapterConfig::new(4, 2.0).with_dropout(dropout);
        let proj = |d_in, d_out, seed| {
            LoraLinearConfig::new(d_in, d_out)
                .init::<B>(device)
                .init_adapter(&adapter, LoraInit::Random, seed, "proj")
                .unwrap()
        };
        let gain = Tensor::random([hidden], Distribution::Uniform(0.5, 1.5), device);
        Self {
            gain: Param::from_tensor(gain),
            up: proj(hidden, inner, seed),
            down: proj(inner, hidden, seed + 1),
        }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.up.forward(x.clone() * self.gain.val().unsqueeze());
        x + self.down.forward(silu(h))
    }
}

fn blocks(dropout: f64) -> Vec<Block<B>> {
    let device = Default::default();
    B::seed(&device, 11);
    (0..3)
        .map(|i| Block::new(8, 12, dropout, 100 + 2 * i, &device))
        .collect()
}

fn input(require_grad: bool) -> Tensor<B, 3> {
    let device = Default::default();
    B::seed(&device, 5);
    let x = Tensor::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
    if require_grad { x.require_grad() } else { x }
}

/// Every float parameter's gradient, in visiting order (`None` for frozen ones).
struct CollectGrads<'a> {
    grads: &'a <B as AutodiffBackend>::Gradients,
    out: Vec<Option<Vec<u32>>>,
}

impl ModuleVisitor<B> for CollectGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.out
            .push(param.grad(self.grads).map(|g| bits(g.into_data())));
    }
}

fn bits(data: TensorData) -> Vec<u32> {
    data.to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The loss bits, the input's gradient bits and every parameter's gradient bits.
type Run = (Vec<u32>, Option<Vec<u32>>, Vec<Option<Vec<u32>>>);

fn run(mode: CheckpointMode, layers: &[Block<B>], x: Tensor<B, 3>) -> Run {
    seed_layers(42);
    let mut h = x.clone();
    for layer in layers {
        h = checkpoint(mode, h, layer, |layer: &Block<B>, x| layer.forward(x));
    }
    let loss = h.powi_scalar(2).mean();
    let loss_bits = bits(loss.to_data());
    let grads = loss.backward();
    let grad_x = x.grad(&grads).map(|g| bits(g.into_data()));
    let mut collect = CollectGrads {
        grads: &grads,
        out: Vec::new(),
    };
    for layer in layers {
        layer.visit(&mut collect);
    }
    (loss_bits, grad_x, collect.out)
}

fn assert_modes_agree(dropout: f64, input_requires_grad: bool) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let layers = blocks(dropout);
    let x = input(input_requires_grad);
    let reference = run(CheckpointMode::Off, &layers, x.clone());
    // 3 blocks × (gain + 2 × (frozen weight, lora_A, lora_B)).
    assert_eq!(reference.2.len(), 3 * 7);
    assert_eq!(reference.2.iter().filter(|g| g.is_some()).count(), 3 * 5);
    assert_eq!(reference.1.is_some(), input_requires_grad);
    for mode in &MODES[1..] {
        let got = run(*mode, &layers, x.clone());
        assert_eq!(got.0, reference.0, "{mode:?}: loss differs");
        assert_eq!(got.1, reference.1, "{mode:?}: input gradient differs");
        for (i, (g, r)) in got.2.iter().zip(&reference.2).enumerate() {
            assert_eq!(g, r, "{mode:?}: gradient of parameter {i} differs");
        }
    }
}

#[test]
fn gradients_match_off_bitwise() {
    assert_modes_agree(0.0, true);
}

#[test]
fn gradients_match_off_bitwise_when_the_input_is_frozen() {
    // The first decoder layer reads frozen embeddings: only its parameters make it tracked.
    assert_modes_agree(0.0, false);
}

#[test]
fn gradients_match_off_bitwise_with_dropout() {
    assert_modes_agree(0.3, true);
}

#[test]
fn dropout_masks_follow_the_layer_seed() {
    // The comparison above would pass with dropout silently off; this shows masks are drawn and
    // depend on the seed stream.
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let layers = blocks(0.5);
    let x = input(true);
    let first = run(CheckpointMode::Recompute, &layers, x.clone());
    let again = run(CheckpointMode::Recompute, &layers, x.clone());
    assert_eq!(first, again, "same layer seeds, same masks");
    let no_dropout = run(CheckpointMode::Recompute, &blocks(0.0), x);
    assert_ne!(first.0, no_dropout.0, "dropout changed nothing");
}

#[test]
fn cpu_backend_is_supported_and_others_fall_back() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    assert!(is_supported::<B>());
    assert!(!is_supported::<Inner>());
    // An autodiff backend this build does not know (Burn's op-level checkpointing strategy; not
    // NdArray<f64>, which would switch the shared CPU device's default float type under the
    // other tests): the layer runs plainly, same gradients.
    type Other = Autodiff<Inner, BalancedCheckpointing>;
    assert!(!is_supported::<Other>());
    let device = Default::default();
    let layer = Block::<Other>::new(4, 6, 0.0, 1, &device);
    let x = Tensor::<Other, 3>::ones([1, 2, 4], &device).require_grad();
    let grads = |mode| {
        let y = checkpoint(mode, x.clone(), &layer, |l: &Block<Other>, x| l.forward(x));
        let grads = y.sum().backward();
        x.grad(&grads).unwrap().into_data()
    };
    assert_eq!(grads(CheckpointMode::Recompute), grads(CheckpointMode::Off));
}

/// Counts the backward states alive: an identity op that, like every Burn op, saves state for
/// backward only when it is tracked, and holds a clone of `live` in that state.
fn probe(x: Tensor<B, 3>, live: &Arc<()>) -> Tensor<B, 3> {
    #[derive(Debug)]
    struct Probe;
    impl Backward<Inner, 1> for Probe {
        type State = Arc<()>;
        fn backward(self, ops: Ops<Arc<()>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<Inner>(&ops.node);
            if let [Some(parent)] = ops.parents {
                grads.register::<Inner>(parent.id, grad);
            }
        }
    }
    let x = x.into_primitive().tensor();
    let prep = <Probe as Backward<Inner, 1>>::prepare::<NoCheckpointing>(Probe, [x.node.clone()])
        .compute_bound()
        .stateful();
    let y = match prep {
        OpsKind::Tracked(prep) => prep.finish(live.clone(), x.primitive),
        OpsKind::UnTracked(prep) => prep.finish(x.primitive),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

#[test]
fn recompute_keeps_no_state_inside_the_layer() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let layers = blocks(0.0);
    for mode in MODES {
        let live = Arc::new(());
        let x = input(true);
        let mut h = x.clone();
        for layer in &layers {
            let live = live.clone();
            h = checkpoint(mode, h, layer, move |layer: &Block<B>, x| {
                probe(layer.forward(x), &live)
            });
        }
        // The closures hold one clone each until the graph frees them with their node.
        let states =
            Arc::strong_count(&live) - 1 - layers.len() * usize::from(mode != CheckpointMode::Off);
        let expected = if mode == CheckpointMode::Off {
            layers.len()
        } else {
            0
        };
        assert_eq!(
            states, expected,
            "{mode:?}: backward states alive after forward"
        );
        let grads = h.sum().backward();
        assert!(x.grad(&grads).is_some());
    }
}

#[test]
#[should_panic(expected = "captures a tensor that requires grad")]
fn capturing_a_trainable_tensor_is_refused() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let layers = blocks(0.0);
    let captured = input(true);
    checkpoint(
        CheckpointMode::Recompute,
        input(true),
        &layers[0],
        move |layer: &Block<B>, x| layer.forward(x) + captured.clone(),
    );
}
