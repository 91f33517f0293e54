//! How the fused optimizers write bfloat16 parameters back: libtorch's round to nearest (the
//! default, bit for bit PyTorch's), stochastic rounding, or Kahan-compensated updates
//! (`csrc/rounding.cpp`, `csrc/rounding_cuda.cu`).
//!
//! Round to nearest drops every update smaller than half a bfloat16 ulp of the weight, which is
//! why `bf16-true` trains worse than `32-true`. Stochastic rounding computes the new weight in
//! float32 and rounds it up or down with probability proportional to the distance, so the
//! update survives in expectation; the random bits come from Philox 4x32-10 keyed by (seed,
//! parameter position, step, element index): the same for any thread count, and after a
//! resume, since the seed and the step counts are in the checkpoint. Kahan summation keeps
//! what each rounding drops in a bfloat16 buffer per parameter and adds it to the next update:
//! deterministic, at the cost of that buffer.
use super::param_group::ParamGroup;
use super::slots::{Field, Shape};
use super::stepper::GroupStep;
use crate::error::{Error, Result};
use crate::native::{self, RoundMode, Rounded};
use serde_json::Value;
use tch::{Kind, Tensor};

/// The Kahan compensation buffer of a parameter.
pub(crate) const KAHAN_COMP: Field = Field {
    name: "kahan_comp",
    shape: Shape::LikeParam,
};

/// The param-group keys the two options are saved under (both checkpoint formats). The seed
/// is an unsigned 64-bit value kept as the signed integer with the same bits, since torch.save
/// checkpoints hold signed 64-bit integers.
const SEED_KEY: &str = "stochastic_rounding_seed";
const KAHAN_KEY: &str = "kahan_summation";

/// A fused optimizer's rounding options, as its builder set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Rounding {
    /// `.stochastic_rounding(seed)`.
    pub stochastic: Option<u64>,
    /// `.kahan_summation(true)`.
    pub kahan: bool,
}

impl Rounding {
    /// The mode the kernels take; `None` for libtorch's round to nearest.
    pub(crate) fn mode(&self) -> Option<RoundMode> {
        match (self.stochastic, self.kahan) {
            (Some(seed), false) => Some(RoundMode::Stochastic { seed }),
            (None, true) => Some(RoundMode::Kahan),
            _ => None,
        }
    }

    /// Refuses both options at once.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.stochastic.is_some() && self.kahan {
            return Err(Error::InvalidConfig {
                field: "kahan_summation",
                value: "true".into(),
                allowed: "not together with stochastic_rounding: choose one of the two",
            });
        }
        Ok(())
    }

    /// The state field the option adds: Kahan's buffer.
    pub(crate) fn fields(&self) -> Vec<Field> {
        if self.kahan {
            vec![KAHAN_COMP]
        } else {
            Vec::new()
        }
    }

    /// Refuses float16 parameters, checked before any group steps: the method holds for
    /// bfloat16, whose values are float32's upper 16 bits, not for float16's narrower range.
    /// float32 and float64 parameters need no rounding and step as without the option.
    pub(crate) fn check_kind(&self, kind: Kind) -> Result<()> {
        if self.mode().is_some() && kind == Kind::Half {
            let field = if self.kahan {
                "kahan_summation"
            } else {
                "stochastic_rounding"
            };
            return Err(Error::InvalidConfig {
                field,
                value: "float16 parameters".into(),
                allowed: "bfloat16 parameters (float32 and float64 ones step as without it); \
                          for float16 use 16-mixed, whose parameters are float32",
            });
        }
        Ok(())
    }

    /// The rounded kernel's extra lists for `step`'s group, or `None` where libtorch's kernel
    /// runs (no option, or parameters that are not bfloat16).
    pub(crate) fn lists<'a>(&self, step: &'a GroupStep<'a>) -> Result<Option<Rounded<'a>>> {
        let Some(mode) = self.mode() else {
            return Ok(None);
        };
        if step.group.kind != Kind::BFloat16 {
            return Ok(None);
        }
        let indices = &step.group.indices;
        Ok(Some(Rounded {
            mode,
            positions: indices.iter().map(|&i| i as i64).collect(),
            comps: if mode == RoundMode::Kahan {
                step.state.all(step.group, &KAHAN_COMP)?
            } else {
                Vec::new()
            },
        }))
    }

    /// Adds the options to a param group (nothing without them, so the default groups stay
    /// PyTorch's).
    pub(crate) fn save(&self, g: &mut ParamGroup) {
        if let Some(seed) = self.stochastic {
            g.insert(SEED_KEY.into(), Value::from(seed as i64));
        }
        if self.kahan {
            g.insert(KAHAN_KEY.into(), Value::Bool(true));
        }
    }

    /// Reads a saved param group: the seed comes from it (so a resumed run draws the bits it
    /// would have drawn); a group saved with an option this optimizer was not built with, or
    /// without Kahan's buffers where it was, is refused.
    pub(crate) fn load(&mut self, g: &ParamGroup) -> Result<()> {
        let seed = match g.get(SEED_KEY) {
            None => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| {
                Error::InvalidState(format!(
                    "param_groups[0]['{SEED_KEY}'] is {v} in the checkpoint: an integer was \
                     expected"
                ))
            })? as u64),
        };
        let kahan = match g.get(KAHAN_KEY) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(Error::InvalidState(format!(
                    "param_groups[0]['{KAHAN_KEY}'] is {v} in the checkpoint: true or false \
                     was expected"
                )))
            }
        };
        if seed.is_some() && self.stochastic.is_none() {
            return Err(Error::InvalidState(
                "the checkpoint's optimizer used stochastic rounding, this one does not: build \
                 it with .stochastic_rounding(seed) (the checkpoint's seed is then used)"
                    .into(),
            ));
        }
        if kahan != self.kahan {
            return Err(Error::InvalidState(format!(
                "the checkpoint's optimizer {} Kahan summation, this one {}: build it with \
                 .kahan_summation({kahan})",
                if kahan { "used" } else { "did not use" },
                if self.kahan { "does" } else { "does not" },
            )));
        }
        if let Some(seed) = seed {
            self.stochastic = Some(seed);
        }
        Ok(())
    }
}

/// Rounds a float32 tensor to bfloat16 stochastically, exactly as the fused optimizers'
/// `.stochastic_rounding(seed)` rounds the parameter at position `position` (its index in the
/// optimizer's parameter list) at step `step`: element `i` rounds up or down with probability
/// proportional to the distance, using the random bits of element `i` under that key. For
/// tests, and for rounding weights to bfloat16 without bias.
///
/// Exact bfloat16 values, infinities and zeros stay as they are; NaN stays NaN; values past the
/// largest finite bfloat16 round to it or to infinity.
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// let x = Tensor::full([4096], 1.0 + 1.0 / 512.0, (Kind::Float, Device::Cpu));
/// let r = tch_fabric::optim::stochastic_round(&x, 7, 0, 1)?;
/// let up = r.to_kind(Kind::Float).gt(1.0).sum(Kind::Int64).int64_value(&[]);
/// assert!((800..1250).contains(&up)); // 1/4 of the way to the next bfloat16 (1 + 1/128)
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a tensor that is not float32; [`Error::Native`] for a CUDA
/// tensor in a build without the `cuda` feature.
pub fn stochastic_round(x: &Tensor, seed: u64, position: u32, step: u32) -> Result<Tensor> {
    if x.kind() != Kind::Float {
        return Err(Error::InvalidConfig {
            field: "x",
            value: format!("{:?}", x.kind()),
            allowed: "a float32 tensor",
        });
    }
    native::stochastic_round(x, seed, position, step)
}
