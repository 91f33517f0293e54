//! A checked load: every check against the models, optimizers and scaler of a Fabric runs
//! first ([`plan_load`]), and only a load that passed them all changes anything ([`apply`]).
use super::layout::{Model, SharedOptimizer, OPTIMIZER_PREFIX};
use super::{fail, Contents};
use crate::dtype;
use crate::error::{Op, Result};
use crate::native;
use crate::optim::ParamGroup;
use crate::precision::Precision;
use crate::scaler::{GradScaler, GradScalerState};
use std::collections::HashSet;
use std::path::Path;
use tch::{Kind, Tensor};

/// A checked load: what [`apply`] will change.
pub(crate) struct Plan {
    /// (destination variable, source tensor) for every model variable.
    weights: Vec<(Tensor, Tensor)>,
    /// Each optimizer's state.
    optimizer_states: Vec<Vec<(String, Tensor)>>,
    /// The scaler state to load, when both sides have one.
    scaler: Option<GradScalerState>,
    /// PyTorch param groups to load, by optimizer index (torch.save files only).
    param_groups: Vec<(usize, Vec<ParamGroup>)>,
    /// What a non-strict load leaves out.
    pub report: LoadReport,
}

/// What a non-strict load ([`crate::Fabric::load_non_strict`]) left out: PyTorch's
/// `load_state_dict(strict=False)` report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables of the models set up that the checkpoint does not hold (they keep their
    /// values), by checkpoint key.
    pub missing_keys: Vec<String>,
    /// Tensors of the checkpoint that match no variable or optimizer (ignored).
    pub unexpected_keys: Vec<String>,
    /// State the checkpoint lacks besides weights, which keeps its current value: an
    /// optimizer's (`optimizer`, `optimizer_1`, ...) or the GradScaler's (`scaler`).
    pub missing_state: Vec<String>,
}

/// How a load treats what does not fit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// The Fabric's precision, which the weights are converted to.
    pub precision: Precision,
    /// Whether a finite weight may become inf in that conversion.
    pub allow_overflow: bool,
    /// Whether missing and unexpected weights are refused (else reported).
    pub strict: bool,
}

/// Checks `contents` against the models, optimizers and scaler of a Fabric, changing nothing.
/// Unless `rules.strict`, missing and unexpected weights are reported in the plan instead of
/// refused. Weights saved in another floating dtype are converted here, and a finite value
/// that the conversion turns into inf is an error unless `rules.allow_overflow`.
pub(crate) fn plan_load(
    path: &Path,
    contents: &Contents,
    models: &[Model],
    optimizers: &[SharedOptimizer],
    scaler: &GradScaler,
    rules: Rules,
) -> Result<Plan> {
    let Rules {
        precision,
        allow_overflow,
        strict,
    } = rules;
    let bad = |reason: String| fail(path, reason);
    let mut weights = Vec::new();
    let mut claimed: Vec<&str> = Vec::new();
    let mut report = LoadReport {
        missing_state: contents.missing.clone(),
        ..LoadReport::default()
    };
    // A tch-fabric file records how many optimizers it holds (a torch.save file has an entry
    // per optimizer): one set up here that the file lacks would silently start fresh.
    if let Some(saved) = contents.optimizers.filter(|&n| n < optimizers.len()) {
        report
            .missing_state
            .extend((saved..optimizers.len()).map(super::torch::optimizer_key));
    }
    for m in models {
        for (key, p) in m.entries()? {
            let Some((k, t)) = contents.tensors.get_key_value(&key) else {
                if strict {
                    return Err(bad(format!("parameter '{key}' is not in the checkpoint")));
                }
                report.missing_keys.push(key);
                continue;
            };
            let (want, got) = (native::shape(&p)?, native::shape(t)?);
            if want != got {
                return Err(bad(format!(
                    "parameter '{key}' has shape {got:?} in the checkpoint but {want:?} in the model"
                )));
            }
            claimed.push(k);
            let src = converted(path, &key, &p, t, precision, allow_overflow)?;
            weights.push((p, src));
        }
    }
    let mut optimizer_states: Vec<Vec<(String, Tensor)>> =
        optimizers.iter().map(|_| Vec::new()).collect();
    // The storage of every weight loaded: a checkpoint tensor that is one of them under another
    // name (a tied weight, which PyTorch's state_dict lists under each name) is that weight.
    let mut loaded = HashSet::new();
    for key in &claimed {
        if let Some(m) = native::meta(&contents.tensors[*key])?.filter(|m| m.data != 0) {
            loaded.insert((m.data, m.kind, m.numel));
        }
    }
    for (key, t) in &contents.tensors {
        if claimed.contains(&key.as_str()) {
            continue;
        }
        let tied = native::meta(t)?.is_some_and(|m| loaded.contains(&(m.data, m.kind, m.numel)));
        if tied && !key.starts_with(OPTIMIZER_PREFIX) {
            continue;
        }
        let slot = key.strip_prefix(OPTIMIZER_PREFIX).and_then(|rest| {
            let (i, name) = rest.split_once('.')?;
            Some((i.parse::<usize>().ok()?, name))
        });
        match slot {
            Some((i, name)) if i < optimizer_states.len() => {
                optimizer_states[i].push((name.to_string(), t.shallow_clone()))
            }
            _ if !strict => report.unexpected_keys.push(key.clone()),
            _ => {
                return Err(bad(format!(
                "tensor '{key}' in the checkpoint matches no parameter or optimizer of this Fabric"
            )))
            }
        }
    }
    if strict && !report.missing_state.is_empty() {
        return Err(bad(format!(
            "the checkpoint has no state for {:?} (set up here): load it with load_non_strict \
             to keep their state as it is",
            report.missing_state
        )));
    }
    // The param groups first: one of another optimizer type explains a state that does not fit.
    let mut param_groups: Vec<(usize, Vec<ParamGroup>)> = Vec::new();
    for (&i, groups) in &contents.param_groups {
        let opt = optimizers.get(i).ok_or_else(|| {
            bad(format!(
                "a param group for optimizer {i}, which does not exist"
            ))
        })?;
        opt.borrow()
            .check_param_groups(groups)
            .map_err(|e| bad(format!("optimizer {i}: {e}")))?;
        param_groups.push((i, groups.clone()));
    }
    for (i, (opt, st)) in optimizers.iter().zip(&optimizer_states).enumerate() {
        opt.borrow()
            .check_state(st)
            .map_err(|e| bad(format!("optimizer {i}: {e}")))?;
    }
    let scaler = scaler.is_enabled().then_some(scaler);
    let scaler_state = match (&contents.scaler, scaler) {
        (Some(s), Some(scaler)) => {
            scaler.check_state_dict(s)?;
            Some(s.clone())
        }
        (None, Some(_)) if strict => {
            return Err(bad(format!(
                "the checkpoint holds no GradScaler state, which {precision} needs: load it \
                 with load_non_strict to keep the current scale"
            )))
        }
        (None, Some(_)) => {
            report
                .missing_state
                .push(super::torch::SCALER_KEY.to_string());
            None
        }
        (Some(_), None) => {
            log::info!(
                "checkpoint {} holds a GradScaler state that {precision} does not use",
                path.display()
            );
            None
        }
        (None, None) => None,
    };
    if contents.precision != precision {
        log::info!(
            "checkpoint {} was saved with {}; converting its weights to {precision}",
            path.display(),
            contents.precision
        );
    }
    Ok(Plan {
        weights,
        optimizer_states,
        scaler: scaler_state,
        param_groups,
        report,
    })
}

/// The checkpoint tensor `src` in the dtype of the variable `dst` (a shallow handle when they
/// agree, or when either is not floating: `copy_` converts those as PyTorch does), refusing a
/// conversion that overflows unless `allow_overflow`.
fn converted(
    path: &Path,
    key: &str,
    dst: &Tensor,
    src: &Tensor,
    precision: Precision,
    allow_overflow: bool,
) -> Result<Tensor> {
    let (Some(d), Some(s)) = (native::meta(dst)?, native::meta(src)?) else {
        return Ok(src.shallow_clone());
    };
    if d.kind == s.kind || !dtype::is_float(d.kind) || !dtype::is_float(s.kind) {
        return Ok(src.shallow_clone());
    }
    let out = src.f_to_kind(d.kind).op("to_kind")?;
    if allow_overflow {
        return Ok(out);
    }
    let overflow = src
        .f_isfinite()
        .and_then(|finite| out.f_isinf().and_then(|inf| finite.f_logical_and(&inf)))
        .op("isfinite")?;
    let count = overflow
        .f_sum(Kind::Int64)
        .and_then(|n| n.f_int64_value(&[]))
        .op("sum")?;
    if count > 0 {
        let largest = src
            .f_masked_select(&overflow)
            .and_then(|v| v.f_abs())
            .and_then(|v| v.f_max())
            .and_then(|v| v.f_double_value(&[]))
            .op("max")?;
        return Err(fail(
            path,
            format!(
                "parameter '{key}' has {count} finite value(s) saved as {} (the largest of \
                 magnitude {largest:e}) that become inf in {} under {precision}: load it in a \
                 precision with a wider range, or allow it with \
                 FabricBuilder::allow_load_overflow(true)",
                dtype::name(s.kind),
                dtype::name(d.kind)
            ),
        ));
    }
    Ok(out)
}

/// Applies a checked load.
pub(crate) fn apply(
    plan: Plan,
    optimizers: &[SharedOptimizer],
    scaler: &mut GradScaler,
) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (dst, src) in &plan.weights {
            dst.shallow_clone().f_copy_(src).op("copy_")?;
        }
        Ok(())
    })?;
    for (opt, st) in optimizers.iter().zip(&plan.optimizer_states) {
        opt.borrow_mut().load_state(st)?;
    }
    for (i, groups) in &plan.param_groups {
        optimizers[*i].borrow_mut().load_param_groups(groups)?;
    }
    if let Some(s) = &plan.scaler {
        scaler.load_state_dict(s)?;
    }
    Ok(())
}
