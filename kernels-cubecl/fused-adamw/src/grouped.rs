//! [`GroupedAdamW`]: the AdamW step of a whole module with one kernel launch per group of up to
//! 16 parameter tensors on the CubeCL backends.

use std::marker::PhantomData;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, LearningRate, MultiGradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;

use crate::{FusedAdamW, FusedAdamWConfig};

/// The optimizer state: Burn's `OptimizerAdaptor<FusedAdamW, M, B>` record (per parameter id,
/// Burn's `AdamWState`), so checkpoints written by either optimizer load into the other.
pub type GroupedAdamWRecord<M, B> = <OptimizerAdaptor<FusedAdamW, M, B> as Optimizer<M, B>>::Record;

/// AdamW over every parameter of a module at once: on a CubeCL backend of a runtime compiled in
/// ([`crate::fused_backend`]) the parameters with gradients are stepped in groups of up to 16
/// tensors of one dtype (fewer where the runtime allows fewer bindings per kernel), one kernel
/// launch and three output buffers per group
/// (`kernels::adamw_step`); elsewhere, or with Burn's per-parameter gradient clipping, each
/// parameter is stepped as [`FusedAdamW`] through Burn's `OptimizerAdaptor`. The math is
/// [`FusedAdamW`]'s either way.
///
/// A LoRA model has hundreds of small adapter tensors (420 on SmolLM2-135M): one launch per
/// tensor, each with Burn's per-parameter bookkeeping, left the GPU waiting on the host for
/// most of the optimizer step.
///
/// Built by [`FusedAdamWConfig::init_grouped`].
pub struct GroupedAdamW<M: AutodiffModule<B>, B: AutodiffBackend> {
    optim: FusedAdamW,
    grad_clipping: Option<burn::grad_clipping::GradientClippingConfig>,
    records: GroupedAdamWRecord<M, B>,
    module: PhantomData<M>,
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Clone for GroupedAdamW<M, B> {
    fn clone(&self) -> Self {
        Self {
            optim: self.optim.clone(),
            grad_clipping: self.grad_clipping.clone(),
            records: self.records.clone(),
            module: PhantomData,
        }
    }
}

impl FusedAdamWConfig {
    /// The optimizer for module `M` on autodiff backend `B`, stepping all parameters together
    /// ([`GroupedAdamW`]).
    pub fn init_grouped<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> GroupedAdamW<M, B> {
        GroupedAdamW {
            optim: self.build(),
            grad_clipping: self.grad_clipping.clone(),
            records: Default::default(),
            module: PhantomData,
        }
    }
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> GroupedAdamW<M, B> {
    /// Each parameter stepped alone through Burn's adaptor (the same `FusedAdamW` math).
    fn step_each(
        &mut self,
        step: impl FnOnce(&mut OptimizerAdaptor<FusedAdamW, M, B>, M) -> M,
        module: M,
    ) -> M {
        let mut adaptor = OptimizerAdaptor::<FusedAdamW, M, B>::from(self.optim.clone());
        if let Some(config) = &self.grad_clipping {
            adaptor = adaptor.with_grad_clipping(config.init());
        }
        let mut adaptor = adaptor.load_record(std::mem::take(&mut self.records));
        let module = step(&mut adaptor, module);
        self.records = adaptor.to_record();
        module
    }
}

impl<M: AutodiffModule<B>, B: AutodiffBackend> Optimizer<M, B> for GroupedAdamW<M, B> {
    type Record = GroupedAdamWRecord<M, B>;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        #[cfg(feature = "cubecl")]
        if self.grad_clipping.is_none() {
            use crate::dispatch::{CubeRuntimeKind, cube_runtime};
            match cube_runtime::<B::InnerBackend>() {
                #[cfg(feature = "cuda")]
                Some(CubeRuntimeKind::Cuda) => {
                    return cube_grouped::step::<M, B, cubecl::cuda::CudaRuntime>(
                        self, lr, module, grads,
                    );
                }
                #[cfg(feature = "wgpu")]
                Some(CubeRuntimeKind::Wgpu) => {
                    return cube_grouped::step::<M, B, cubecl::wgpu::WgpuRuntime>(
                        self, lr, module, grads,
                    );
                }
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        self.step_each(|adaptor, module| adaptor.step(lr, module, grads), module)
    }

    /// Gradients from several devices: each parameter stepped alone, as Burn's adaptor does.
    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        self.step_each(
            |adaptor, module| adaptor.step_multi(lr, module, grads),
            module,
        )
    }

    fn to_record(&self) -> Self::Record {
        self.records.clone()
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.records = record;
        self
    }
}

#[cfg(feature = "cubecl")]
mod cube_grouped {
    use std::collections::HashMap;

    use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
    use burn::optim::AdamWState;
    use burn::optim::AdaptiveMomentumState;
    use burn::optim::record::AdaptorRecord;
    use burn::prelude::*;
    use burn::tensor::DType;
    use burn_cubecl::CubeRuntime;
    use burn_cubecl::tensor::CubeTensor;

    use super::*;
    use crate::cube::kernel_takes;
    use crate::dispatch::{from_prim, into_prim};
    use crate::kernels::adamw_step::{self, GroupMember, StepScalars, capacity};

    /// What the group launches need of one parameter.
    struct Pending<R: CubeRuntime> {
        id: ParamId,
        member: GroupMember<R>,
        /// The step count after this step.
        time: usize,
        /// Kept as it is (AMSGrad is off).
        max_moment_2: Option<CubeTensor<R>>,
    }

    /// What the tensors of one launch share: dtype, step count after this step, and whether
    /// this is their first step (no moments yet).
    type GroupKey = (DType, usize, bool);

    /// A parameter's new value and state, rank-free until the mapper puts them back.
    struct Stepped<R: CubeRuntime> {
        param: CubeTensor<R>,
        moment_1: CubeTensor<R>,
        moment_2: CubeTensor<R>,
        time: usize,
        max_moment_2: Option<CubeTensor<R>>,
    }

    /// Takes each parameter's gradient and state; parameters the kernel cannot take (a dtype it
    /// does not handle, mismatched shapes or devices) are stepped alone on the spot.
    struct Collect<'a, M: AutodiffModule<B>, B: AutodiffBackend, R: CubeRuntime> {
        optim: &'a FusedAdamW,
        lr: LearningRate,
        grads: GradientsParams,
        records: &'a mut GroupedAdamWRecord<M, B>,
        pending: Vec<Pending<R>>,
        alone: HashMap<ParamId, Stepped<R>>,
    }

    impl<M: AutodiffModule<B>, B: AutodiffBackend, R: CubeRuntime> ModuleVisitor<B>
        for Collect<'_, M, B, R>
    {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            let tensor = param.val().inner();
            let state: Option<AdamWState<B::InnerBackend, D>> = self
                .records
                .remove(&param.id)
                .map(|record| record.into_state::<D>());
            if !kernel_takes(&tensor, &grad, state.as_ref()) {
                let (tensor, state) =
                    burn::optim::SimpleOptimizer::step(self.optim, self.lr, tensor, grad, state);
                let state = state.expect("AdamW always returns a state");
                let prim = |t: Tensor<B::InnerBackend, D>| into_prim::<_, CubeTensor<R>, D>(t);
                self.alone.insert(
                    param.id,
                    Stepped {
                        param: prim(tensor),
                        moment_1: prim(state.momentum.moment_1),
                        moment_2: prim(state.momentum.moment_2),
                        time: state.momentum.time,
                        max_moment_2: state.momentum.max_moment_2.map(prim),
                    },
                );
                return;
            }
            let prim = |t: Tensor<B::InnerBackend, D>| into_prim::<_, CubeTensor<R>, D>(t);
            let (time, moments, max_moment_2) = match state {
                Some(AdamWState { momentum }) => (
                    momentum.time + 1,
                    Some((prim(momentum.moment_1), prim(momentum.moment_2))),
                    momentum.max_moment_2.map(prim),
                ),
                None => (1, None, None),
            };
            self.pending.push(Pending {
                id: param.id,
                member: GroupMember {
                    param: prim(tensor),
                    grad: prim(grad),
                    moments,
                },
                time,
                max_moment_2,
            });
        }
    }

    /// Puts the new values into the module and their states into the records.
    struct Apply<'a, M: AutodiffModule<B>, B: AutodiffBackend, R: CubeRuntime> {
        stepped: HashMap<ParamId, Stepped<R>>,
        records: &'a mut GroupedAdamWRecord<M, B>,
    }

    impl<M: AutodiffModule<B>, B: AutodiffBackend, R: CubeRuntime> ModuleMapper<B>
        for Apply<'_, M, B, R>
    {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let Some(new) = self.stepped.remove(&id) else {
                return Param::from_mapped_value(id, tensor, mapper);
            };
            let tensor = {
                let inner = from_prim::<B::InnerBackend, CubeTensor<R>, D>(new.param);
                let value = Tensor::from_inner(inner);
                if tensor.is_require_grad() {
                    value.require_grad()
                } else {
                    value
                }
            };
            let tensor_of = |t: CubeTensor<R>| from_prim::<B::InnerBackend, CubeTensor<R>, D>(t);
            let state = AdamWState {
                momentum: AdaptiveMomentumState {
                    time: new.time,
                    moment_1: tensor_of(new.moment_1),
                    moment_2: tensor_of(new.moment_2),
                    max_moment_2: new.max_moment_2.map(tensor_of),
                },
            };
            self.records.insert(id, AdaptorRecord::from_state(state));
            Param::from_mapped_value(id, tensor, mapper)
        }
    }

    /// The grouped step on runtime `R` (`B::InnerBackend`'s float primitive is `CubeTensor<R>`).
    pub(super) fn step<M: AutodiffModule<B>, B: AutodiffBackend, R: CubeRuntime>(
        optim: &mut GroupedAdamW<M, B>,
        lr: LearningRate,
        module: M,
        grads: GradientsParams,
    ) -> M {
        let mut collect = Collect::<M, B, R> {
            optim: &optim.optim,
            lr,
            grads,
            records: &mut optim.records,
            pending: Vec::new(),
            alone: HashMap::new(),
        };
        module.visit(&mut collect);
        let Collect {
            pending, mut alone, ..
        } = collect;

        // Groups share a dtype, a step count and whether moments exist, in module order.
        let mut groups: Vec<(GroupKey, Vec<Pending<R>>)> = Vec::new();
        let most = pending
            .first()
            .map_or(1, |p| capacity(&p.member.param.client));
        for p in pending {
            let key = (p.member.param.dtype, p.time, p.member.moments.is_none());
            match groups.iter_mut().find(|(k, g)| *k == key && g.len() < most) {
                Some((_, group)) => group.push(p),
                None => groups.push((key, vec![p])),
            }
        }
        let FusedAdamW {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            ..
        } = optim.optim;
        for ((_, time, _), group) in groups {
            let scalars = StepScalars {
                beta_1,
                beta_2,
                epsilon,
                weight_decay,
                lr,
                time,
            };
            let (rest, members): (Vec<_>, Vec<_>) = group
                .into_iter()
                .map(|p| ((p.id, p.max_moment_2), p.member))
                .unzip();
            let outputs = adamw_step::launch::<R>(members, &scalars);
            for ((id, max_moment_2), out) in rest.into_iter().zip(outputs) {
                alone.insert(
                    id,
                    Stepped {
                        param: out.param,
                        moment_1: out.moment_1,
                        moment_2: out.moment_2,
                        time,
                        max_moment_2,
                    },
                );
            }
        }
        module.map(&mut Apply::<M, B, R> {
            stepped: alone,
            records: &mut optim.records,
        })
    }
}
