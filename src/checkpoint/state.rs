//! The user state a checkpoint carries: refused at save time where the file could not give it
//! back as it was (a save that loads as something else, or not at all, loses it).

use crate::error::{Error, Result};
use serde::Serialize;
use serde_value::Value;

/// Checks that `state` survives a save in either format: no NaN or infinite float (the state
/// travels as JSON, which has neither: serde_json writes them as `null`, which then fails to
/// load as a float) and, in a torch.save file (`torch_format`), no integer past `i64` (a
/// pickle int in libtorch).
///
/// # Errors
///
/// [`Error::Usage`] naming the first such entry; [`Error::Json`]-like serialisation errors as
/// [`Error::Usage`] too.
pub(crate) fn check_round_trip<S: Serialize + ?Sized>(state: &S, torch_format: bool) -> Result<()> {
    let value = serde_value::to_value(state)
        .map_err(|e| Error::Usage(format!("the user state cannot be serialised: {e}")))?;
    walk(&value, "", torch_format)
}

fn walk(v: &Value, at: &str, torch_format: bool) -> Result<()> {
    let name = |at: &str| {
        if at.is_empty() {
            "the user state".to_string()
        } else {
            format!("the user state's entry '{at}'")
        }
    };
    let float = |x: f64| -> Result<()> {
        if x.is_finite() {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "{} is {x}, which a checkpoint cannot give back (its state is JSON, which has no \
                 NaN or infinity); save it as a string or a tensor",
                name(at)
            )))
        }
    };
    let child = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match v {
        Value::F32(x) => float(f64::from(*x)),
        Value::F64(x) => float(*x),
        Value::U64(x) if torch_format && i64::try_from(*x).is_err() => Err(Error::Usage(format!(
            "{} is {x}, past the largest integer a torch.save file holds (i64); save it as a \
             string, or use a .safetensors checkpoint",
            name(at)
        ))),
        Value::Option(Some(x)) | Value::Newtype(x) => walk(x, at, torch_format),
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| walk(x, &format!("{at}[{i}]"), torch_format)),
        Value::Map(entries) => entries.iter().try_for_each(|(k, x)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            walk(k, &child(&key), torch_format)?;
            walk(x, &child(&key), torch_format)
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn nan_inf_and_big_integers_are_named() {
        let e = check_round_trip(&BTreeMap::from([("loss", f64::NAN)]), false).unwrap_err();
        assert!(e.to_string().contains("entry 'loss' is NaN"), "{e}");
        let nested = BTreeMap::from([("best", vec![1.0, f64::INFINITY])]);
        let e = check_round_trip(&nested, true).unwrap_err();
        assert!(e.to_string().contains("'best[1]' is inf"), "{e}");
        let big = BTreeMap::from([("seed", u64::MAX)]);
        assert!(check_round_trip(&big, false).is_ok());
        let e = check_round_trip(&big, true).unwrap_err();
        assert!(e.to_string().contains("18446744073709551615"), "{e}");
        assert!(check_round_trip(&BTreeMap::from([("seed", 1u64 << 62)]), true).is_ok());
        assert!(check_round_trip(&BTreeMap::from([("x", f32::NEG_INFINITY)]), false).is_err());
    }
}
