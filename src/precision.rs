//! [`Precision`]: Lightning Fabric's precision values, parsed and queried.
use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use tch::Kind;

/// Every value Lightning accepts, in the order its error message lists them (Lightning's own
/// `transformer-engine` values are left out: tch-fabric does not support Transformer Engine).
const ALLOWED: &str =
    "('16-true', '16-mixed', 'bf16-true', 'bf16-mixed', '32-true', '64-true', 64, 32, 16, '64', '32', '16', 'bf16')";

/// How a model is trained: which dtype holds the parameters, which dtype the forward computes
/// in, and whether a gradient scaler is needed. The values and their spellings are Lightning
/// Fabric's.
///
/// | value | parameters | forward | scaler |
/// |---|---|---|---|
/// | `"64-true"` | float64 | float64 | no |
/// | `"32-true"` | float32 | float32 | no |
/// | `"16-mixed"` | float32 | float16 autocast | yes |
/// | `"bf16-mixed"` | float32 | bfloat16 autocast | no |
/// | `"16-true"` | float16 | float16 | no |
/// | `"bf16-true"` | bfloat16 | bfloat16 | no |
///
/// Parsing accepts the canonical strings above and Lightning's legacy spellings: `"64"` and
/// `"32"` silently, `"16"` and `"bf16"` with Lightning's deprecation warning (through the
/// `log` facade). Integers go through [`TryFrom<i64>`]. Matching is case-sensitive, exactly as
/// in Lightning, so a script behaves the same in both; a wrong case gets a suggestion.
///
/// ```
/// use tch_fabric::Precision;
/// let p: Precision = "bf16-mixed".parse()?;
/// assert_eq!(p, Precision::Bf16Mixed);
/// assert_eq!(p.to_string(), "bf16-mixed");
/// assert_eq!(p.autocast_dtype(), Some(tch::Kind::BFloat16));
/// assert_eq!(Precision::try_from(64)?, Precision::F64True);
/// assert!("fp16".parse::<Precision>().is_err());
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// `"64-true"`: everything in float64.
    F64True,
    /// `"32-true"`: everything in float32 (the default).
    #[default]
    F32True,
    /// `"16-mixed"`: float32 parameters, float16 autocast, dynamic loss scaling.
    F16Mixed,
    /// `"bf16-mixed"`: float32 parameters, bfloat16 autocast, no scaling.
    Bf16Mixed,
    /// `"16-true"`: parameters and compute in float16.
    F16True,
    /// `"bf16-true"`: parameters and compute in bfloat16.
    Bf16True,
}

impl Precision {
    /// Every precision, in the order of the table above.
    pub const ALL: [Precision; 6] = [
        Precision::F64True,
        Precision::F32True,
        Precision::F16Mixed,
        Precision::Bf16Mixed,
        Precision::F16True,
        Precision::Bf16True,
    ];

    /// The canonical string (`"bf16-mixed"`, ...), which [`FromStr`] parses back.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F64True => "64-true",
            Precision::F32True => "32-true",
            Precision::F16Mixed => "16-mixed",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16True => "16-true",
            Precision::Bf16True => "bf16-true",
        }
    }

    /// The autocast dtype of a mixed precision, `None` for the others.
    pub fn autocast_dtype(self) -> Option<Kind> {
        match self {
            Precision::F16Mixed => Some(Kind::Half),
            Precision::Bf16Mixed => Some(Kind::BFloat16),
            _ => None,
        }
    }

    /// The dtype parameters are kept in (float32 for mixed precisions).
    pub fn param_dtype(self) -> Kind {
        match self {
            Precision::F64True => Kind::Double,
            Precision::F32True | Precision::F16Mixed | Precision::Bf16Mixed => Kind::Float,
            Precision::F16True => Kind::Half,
            Precision::Bf16True => Kind::BFloat16,
        }
    }

    /// The dtype Lightning converts floating inputs to before the forward: the low dtype for
    /// mixed and `-true` precisions, float64 for `64-true`, float32 otherwise.
    pub fn input_dtype(self) -> Kind {
        match self {
            Precision::F64True => Kind::Double,
            Precision::F32True => Kind::Float,
            Precision::F16Mixed | Precision::F16True => Kind::Half,
            Precision::Bf16Mixed | Precision::Bf16True => Kind::BFloat16,
        }
    }

    /// Whether training needs dynamic loss scaling (only `"16-mixed"`).
    pub fn needs_grad_scaler(self) -> bool {
        self == Precision::F16Mixed
    }

    /// Whether the forward runs under autocast.
    pub fn is_mixed(self) -> bool {
        self.autocast_dtype().is_some()
    }

    fn from_canonical(s: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Lightning's legacy spellings: (alias, canonical, warns).
    fn from_alias(s: &str) -> Option<(Precision, bool)> {
        Some(match s {
            "64" => (Precision::F64True, false),
            "32" => (Precision::F32True, false),
            "16" => (Precision::F16Mixed, true),
            "bf16" => (Precision::Bf16Mixed, true),
            _ => return None,
        })
    }

    fn parse(value: &str, quoted: String) -> Result<Precision> {
        if let Some(p) = Precision::from_canonical(value) {
            return Ok(p);
        }
        if let Some((p, warns)) = Precision::from_alias(value) {
            if warns {
                log::warn!(
                    "`precision={value}` is supported for historical reasons but its usage is discouraged. \
                     Please set your precision to {p} instead!"
                );
            }
            return Ok(p);
        }
        Err(Error::InvalidPrecision {
            value: quoted,
            allowed: ALLOWED,
            suggestion: suggest(value),
        })
    }
}

/// The closest canonical value for something that looks like a typo or a common synonym.
fn suggest(value: &str) -> Option<&'static str> {
    let lower = value.trim().to_ascii_lowercase();
    if let Some(p) = Precision::from_canonical(&lower) {
        return Some(p.as_str());
    }
    if let Some((p, _)) = Precision::from_alias(&lower) {
        return Some(p.as_str());
    }
    let synonym = match lower.as_str() {
        "fp16" | "float16" | "half" | "amp" | "fp16-mixed" | "16-amp" => Some(Precision::F16Mixed),
        "bfloat16" | "bf16-amp" => Some(Precision::Bf16Mixed),
        "fp32" | "float32" | "float" | "single" => Some(Precision::F32True),
        "fp64" | "float64" | "double" => Some(Precision::F64True),
        _ => None,
    };
    if let Some(p) = synonym {
        return Some(p.as_str());
    }
    // Plain numbers (128, 8) are not typos of anything.
    if lower.is_empty() || lower.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Precision::ALL
        .into_iter()
        .map(|p| (strsim::levenshtein(&lower, p.as_str()), p.as_str()))
        .filter(|&(d, _)| d <= 3)
        .min_by_key(|&(d, _)| d)
        .map(|(_, s)| s)
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = Error;

    /// Parses a canonical value or a Lightning alias.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPrecision`] listing every allowed value.
    fn from_str(s: &str) -> Result<Self> {
        Precision::parse(s, format!("'{s}'"))
    }
}

impl TryFrom<&str> for Precision {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self> {
        s.parse()
    }
}

impl TryFrom<i64> for Precision {
    type Error = Error;

    /// Lightning's integer values: 64, 32 and 16 (which warns and means `"16-mixed"`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPrecision`] for any other integer.
    fn try_from(v: i64) -> Result<Self> {
        match v {
            64 | 32 | 16 => Precision::parse(&v.to_string(), v.to_string()),
            _ => Err(Error::InvalidPrecision {
                value: v.to_string(),
                allowed: ALLOWED,
                suggestion: None,
            }),
        }
    }
}

impl Serialize for Precision {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Precision {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("16-mix"), Some("16-mixed"));
        assert_eq!(suggest("BF16-MIXED"), Some("bf16-mixed"));
        assert_eq!(suggest("fp16"), Some("16-mixed"));
        assert_eq!(suggest("bf16-tru"), Some("bf16-true"));
        assert_eq!(suggest("128"), None);
        assert_eq!(suggest(""), None);
        assert_eq!(suggest("completely-wrong"), None);
    }
}
