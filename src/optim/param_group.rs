//! PyTorch's `param_groups[0]` of the optimizers that have a PyTorch twin, for torch.save-format
//! checkpoints: written with the keys and values `torch.optim` writes, read back with the
//! optimizer type checked from the keys it holds.
use crate::error::{Error, Result};
use crate::native::{AdamHyper, SgdHyper};
use serde_json::{json, Value};

/// One parameter group's hyper-parameters by PyTorch's names (`lr`, `betas`, `eps`, ...),
/// without `params`: JSON values, where a tuple (`betas`) is an array.
pub type ParamGroup = serde_json::Map<String, Value>;

fn mismatch(key: &str, found: &Value, ours: &str) -> Error {
    Error::InvalidState(format!(
        "param_groups[0]['{key}'] is {found} in the checkpoint, but {ours}"
    ))
}

fn float(g: &ParamGroup, key: &str) -> Result<Option<f64>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| mismatch(key, v, "a number was expected")),
    }
}

fn boolean(g: &ParamGroup, key: &str) -> Result<Option<bool>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| mismatch(key, v, "true or false was expected")),
    }
}

/// `foreach`: None, true or false.
fn optional_bool(g: &ParamGroup, key: &str) -> Result<Option<Option<bool>>> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => v
            .as_bool()
            .map(|b| Some(Some(b)))
            .ok_or_else(|| mismatch(key, v, "None, True or False was expected")),
    }
}

/// Refuses a group whose keys belong to another optimizer, or whose structural options
/// (those that decide the state's fields or the algorithm's family) differ from ours.
fn expect_flag(g: &ParamGroup, key: &str, ours: bool, name: &str) -> Result<()> {
    match boolean(g, key)? {
        Some(v) if v != ours => Err(mismatch(
            key,
            &Value::Bool(v),
            &format!("this optimizer is {name} with {key}={ours}: build it with the same option"),
        )),
        _ => Ok(()),
    }
}

fn other_type(g: &ParamGroup, ours: &str, theirs_keys: &[&str], theirs: &str) -> Result<()> {
    if let Some(k) = theirs_keys.iter().find(|k| g.contains_key(**k)) {
        return Err(Error::InvalidState(format!(
            "the checkpoint's optimizer state is for {theirs} (its param group has '{k}'), \
             but this optimizer is {ours}"
        )));
    }
    Ok(())
}

fn foreach_value(foreach: Option<bool>) -> Value {
    foreach.map_or(Value::Null, Value::Bool)
}

fn adam_name(decoupled: bool) -> &'static str {
    if decoupled {
        "AdamW"
    } else {
        "Adam"
    }
}

/// `torch.optim.AdamW` / `Adam`'s group (`fused` is `fused=True`'s flag).
pub(crate) fn adam_group(
    h: &AdamHyper,
    decoupled: bool,
    foreach: Option<bool>,
    fused: bool,
) -> ParamGroup {
    let v = json!({
        "betas": [h.beta1, h.beta2],
        "eps": h.eps,
        "weight_decay": h.weight_decay,
        "amsgrad": h.amsgrad,
        "maximize": h.maximize,
        "foreach": foreach_value(foreach),
        "capturable": false,
        "differentiable": false,
        "fused": if fused { Value::Bool(true) } else { Value::Null },
        "decoupled_weight_decay": decoupled,
    });
    match v {
        Value::Object(m) => m,
        _ => ParamGroup::new(),
    }
}

/// Reads an Adam-family group into `h` and `foreach`.
pub(crate) fn load_adam(
    g: &ParamGroup,
    h: &mut AdamHyper,
    decoupled: bool,
    foreach: &mut Option<bool>,
) -> Result<()> {
    let name = adam_name(decoupled);
    other_type(g, name, &["momentum", "nesterov", "dampening"], "SGD")?;
    let betas = g.get("betas").ok_or_else(|| {
        Error::InvalidState(format!(
            "the param group has no 'betas': it is not {name}'s"
        ))
    })?;
    let pair = betas
        .as_array()
        .filter(|b| b.len() == 2)
        .and_then(|b| Some((b[0].as_f64()?, b[1].as_f64()?)))
        .ok_or_else(|| mismatch("betas", betas, "a pair of numbers was expected"))?;
    if let Some(d) = boolean(g, "decoupled_weight_decay")? {
        if d != decoupled {
            return Err(Error::InvalidState(format!(
                "the checkpoint's optimizer state is for {} (decoupled_weight_decay={d}), but \
                 this optimizer is {name}",
                adam_name(d)
            )));
        }
    }
    expect_flag(g, "amsgrad", h.amsgrad, name)?;
    for key in ["capturable", "differentiable"] {
        expect_flag(g, key, false, name)?;
    }
    (h.beta1, h.beta2) = pair;
    h.eps = float(g, "eps")?.unwrap_or(h.eps);
    h.weight_decay = float(g, "weight_decay")?.unwrap_or(h.weight_decay);
    h.maximize = boolean(g, "maximize")?.unwrap_or(h.maximize);
    if let Some(saved) = optional_bool(g, "foreach")? {
        *foreach = saved;
    }
    Ok(())
}

/// `torch.optim.SGD`'s group.
pub(crate) fn sgd_group(h: &SgdHyper, foreach: Option<bool>, fused: bool) -> ParamGroup {
    let v = json!({
        "momentum": h.momentum,
        "dampening": h.dampening,
        "weight_decay": h.weight_decay,
        "nesterov": h.nesterov,
        "maximize": h.maximize,
        "foreach": foreach_value(foreach),
        "differentiable": false,
        "fused": if fused { Value::Bool(true) } else { Value::Null },
    });
    match v {
        Value::Object(m) => m,
        _ => ParamGroup::new(),
    }
}

/// Reads an SGD group into `h` and `foreach`.
pub(crate) fn load_sgd(g: &ParamGroup, h: &mut SgdHyper, foreach: &mut Option<bool>) -> Result<()> {
    other_type(g, "SGD", &["betas", "eps", "amsgrad"], "the Adam family")?;
    if !g.contains_key("momentum") {
        return Err(Error::InvalidState(
            "the param group has no 'momentum': it is not SGD's".to_string(),
        ));
    }
    expect_flag(g, "differentiable", false, "SGD")?;
    h.momentum = float(g, "momentum")?.unwrap_or(h.momentum);
    h.dampening = float(g, "dampening")?.unwrap_or(h.dampening);
    h.weight_decay = float(g, "weight_decay")?.unwrap_or(h.weight_decay);
    h.nesterov = boolean(g, "nesterov")?.unwrap_or(h.nesterov);
    h.maximize = boolean(g, "maximize")?.unwrap_or(h.maximize);
    if let Some(saved) = optional_bool(g, "foreach")? {
        *foreach = saved;
    }
    Ok(())
}
