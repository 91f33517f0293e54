//! Per-parameter optimizer state: a few named tensors per parameter, created at its first step
//! (as PyTorch creates `optimizer.state[p]`), saved as `<param>.<field>` and loaded back with
//! every check made before anything changes. Which fields a parameter has depends on its
//! param group's options (AMSGrad, momentum), so the field list is per parameter.
use crate::error::{Error, Op, Result};
use crate::native;
use crate::params::{GradBatch, Params};
use tch::{Kind, Tensor};

/// The shape of one state tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The parameter's shape, dtype and device (moments, momentum buffers).
    LikeParam,
    /// A 0-dim float32 on the parameter's device (the step count of fused optimizers).
    Scalar,
    /// A 0-dim float32 on the CPU (the step count of PyTorch's for-loop optimizers, read by
    /// the host every step).
    HostScalar,
}

/// One named state tensor of every parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub shape: Shape,
}

/// New state for the parameters that step for the first time: (parameter index, tensors in
/// field order). Used by the step and committed only once the step succeeded.
pub(crate) type Fresh = Vec<(usize, Vec<Tensor>)>;

/// State of every parameter of one optimizer, in [`Params`] order.
#[derive(Debug)]
pub(crate) struct Slots {
    /// The fields of each parameter.
    fields: Vec<Vec<Field>>,
    state: Vec<Option<Vec<Tensor>>>,
}

impl Slots {
    pub(crate) fn new(len: usize, fields: Vec<Field>) -> Slots {
        Slots {
            fields: vec![fields; len],
            state: (0..len).map(|_| None).collect(),
        }
    }

    /// Changes the fields of the parameters at `indices` (a builder option such as AMSGrad, or
    /// their param group's) while none of them has state.
    pub(crate) fn set_fields(&mut self, indices: &[usize], fields: &[Field]) {
        if indices.iter().all(|&i| self.state[i].is_none()) {
            for &i in indices {
                self.fields[i] = fields.to_vec();
            }
        }
    }

    /// Whether parameter `i` has state, and with which fields.
    pub(crate) fn fields_of(&self, i: usize) -> Option<&[Field]> {
        self.state[i].as_ref().map(|_| self.fields[i].as_slice())
    }

    /// Whether any parameter has state (it stepped, or state was loaded).
    pub(crate) fn has_state(&self) -> bool {
        self.state.iter().any(Option::is_some)
    }

    /// Zero state for each parameter with a gradient, fields and no state yet.
    pub(crate) fn fresh(&self, params: &Params, grads: &GradBatch) -> Result<Fresh> {
        let mut out = Vec::new();
        for (i, _) in grads.defined() {
            if self.state[i].is_some() || self.fields[i].is_empty() {
                continue;
            }
            let p = &params.tensors()[i];
            let device = grads.meta(i).map_or(tch::Device::Cpu, |m| m.device);
            let tensors = self.fields[i]
                .iter()
                .map(|f| match f.shape {
                    Shape::LikeParam => p.f_zeros_like().op("zeros_like"),
                    Shape::Scalar => Tensor::f_zeros([], (Kind::Float, device)).op("zeros"),
                    Shape::HostScalar => {
                        Tensor::f_zeros([], (Kind::Float, tch::Device::Cpu)).op("zeros")
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            out.push((i, tensors));
        }
        Ok(out)
    }

    /// Parameter `i`'s state: existing, or from `fresh`.
    pub(crate) fn of<'a>(&'a self, fresh: &'a Fresh, i: usize) -> Option<&'a [Tensor]> {
        match &self.state[i] {
            Some(s) => Some(s),
            None => fresh
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, s)| s.as_slice()),
        }
    }

    /// The tensor of `field` in parameter `i`'s state.
    pub(crate) fn field<'a>(
        &self,
        i: usize,
        state: &'a [Tensor],
        field: &str,
    ) -> Option<&'a Tensor> {
        self.fields[i]
            .iter()
            .position(|f| f.name == field)
            .and_then(|k| state.get(k))
    }

    /// Keeps the state created for a step that succeeded.
    pub(crate) fn commit(&mut self, fresh: Fresh) {
        for (i, s) in fresh {
            self.state[i] = Some(s);
        }
    }

    /// Every parameter's state as `<param>.<field>` tensors (shallow handles).
    pub(crate) fn state_tensors(&self, params: &Params) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((name, state), fields) in params.names().iter().zip(&self.state).zip(&self.fields) {
            let Some(state) = state else { continue };
            for (f, t) in fields.iter().zip(state) {
                out.push((format!("{name}.{}", f.name), t.shallow_clone()));
            }
        }
        out
    }

    /// State from `tensors` for every parameter, copied to its device and dtype, without
    /// applying it: a parameter has state when its first field is present, and then every
    /// field must be there with the right shape and possible values ([`check_values`]). A
    /// tensor that belongs to no field of any parameter is refused too.
    pub(crate) fn prepare_load(
        &self,
        params: &Params,
        tensors: &[(String, Tensor)],
    ) -> Result<Vec<Option<Vec<Tensor>>>> {
        let find = |key: &str| tensors.iter().find(|(n, _)| n == key).map(|(_, t)| t);
        let mut used = 0;
        let mut out = Vec::with_capacity(params.len());
        for ((name, p), fields) in params
            .names()
            .iter()
            .zip(params.tensors())
            .zip(&self.fields)
        {
            let first = fields.first().map(|f| f.name);
            let present = first.is_some_and(|f| find(&format!("{name}.{f}")).is_some());
            if !present {
                out.push(None);
                continue;
            }
            let shape = native::shape(p)?;
            let m = native::meta(p)?
                .ok_or_else(|| Error::Usage(format!("parameter '{name}' is undefined")))?;
            let (kind, device) = (m.kind, m.device);
            let mut state = Vec::with_capacity(fields.len());
            for f in fields {
                let key = format!("{name}.{}", f.name);
                let t = find(&key)
                    .ok_or_else(|| Error::InvalidState(format!("optimizer state lacks '{key}'")))?;
                let got = native::shape(t)?;
                let loaded = match f.shape {
                    Shape::LikeParam if got != shape => {
                        return Err(Error::InvalidState(format!(
                            "optimizer state '{key}' has shape {got:?}, the parameter {shape:?}"
                        )))
                    }
                    Shape::LikeParam => t.f_to_device_(device, kind, false, true),
                    Shape::Scalar | Shape::HostScalar if got.iter().product::<i64>() != 1 => {
                        return Err(Error::InvalidState(format!(
                            "optimizer state '{key}' must hold one number, not shape {got:?}"
                        )))
                    }
                    Shape::Scalar => t
                        .f_to_device_(device, Kind::Float, false, true)
                        .and_then(|t| t.f_reshape([])),
                    Shape::HostScalar => t
                        .f_to_device_(tch::Device::Cpu, Kind::Float, false, true)
                        .and_then(|t| t.f_reshape([])),
                }
                .op("load optimizer state")?;
                check_values(&key, f, &loaded)?;
                state.push(loaded);
                used += 1;
            }
            out.push(Some(state));
        }
        if used != tensors.len() {
            let consumed = |key: &str| {
                params
                    .names()
                    .iter()
                    .zip(&out)
                    .zip(&self.fields)
                    .any(|((n, st), fields)| {
                        st.is_some() && fields.iter().any(|f| key == format!("{n}.{}", f.name))
                    })
            };
            if let Some((key, _)) = tensors.iter().find(|(k, _)| !consumed(k)) {
                let owner = params.names().iter().position(|n| {
                    key.strip_prefix(n.as_str())
                        .is_some_and(|r| r.starts_with('.'))
                });
                let owner = owner.or_else(|| self.fields.iter().position(|f| !f.is_empty()));
                let fields = owner.map_or(&[][..], |i| self.fields[i].as_slice());
                let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
                return Err(Error::InvalidState(format!(
                    "optimizer state '{key}' belongs to no complete state of this optimizer \
                     (a parameter with state has all of {names:?})"
                )));
            }
        }
        Ok(out)
    }

    /// Applies what [`Slots::prepare_load`] returned.
    pub(crate) fn commit_load(&mut self, prepared: Vec<Option<Vec<Tensor>>>) {
        self.state = prepared;
    }
}

/// The values a loaded state tensor may hold, checked after its conversion to the parameter's
/// dtype (so a moment that overflows float16 is caught too): every value finite; a step count
/// ([`Shape::Scalar`]) and a second moment (`exp_avg_sq`, `max_exp_avg_sq`: means of squares)
/// also non-negative. One NaN or negative second moment makes every later update NaN.
fn check_values(key: &str, field: &Field, t: &Tensor) -> Result<()> {
    let scalar = matches!(field.shape, Shape::Scalar | Shape::HostScalar);
    let non_negative = scalar || field.name.ends_with("_sq");
    let all = |mask: std::result::Result<Tensor, tch::TchError>| {
        mask.and_then(|m| m.f_all())
            .and_then(|a| a.f_int64_value(&[]))
            .op("check optimizer state")
            .map(|v| v != 0)
    };
    if !all(t.f_isfinite())? {
        return Err(Error::InvalidState(format!(
            "optimizer state '{key}' holds NaN or infinite values (after conversion to the \
             parameter's dtype): it must be finite"
        )));
    }
    if non_negative && !all(t.f_ge(0.0))? {
        let what = if scalar {
            "a step count"
        } else {
            "a second moment (a mean of squares)"
        };
        return Err(Error::InvalidState(format!(
            "optimizer state '{key}' holds negative values: it is {what}, so it must be >= 0"
        )));
    }
    Ok(())
}
