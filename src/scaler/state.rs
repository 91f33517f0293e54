//! [`GradScalerState`]: the scaler's state with PyTorch's keys, as JSON.
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// The scaler's state with PyTorch's keys, for checkpoints.
///
/// ```
/// use tch_fabric::{GradScaler, GradScalerConfig, scaler::GradScalerState};
/// // A state written by Python: json.dumps(torch.amp.GradScaler().state_dict())
/// let json = r#"{"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
///                "growth_interval": 2000, "_growth_tracker": 17}"#;
/// let mut scaler = GradScaler::new(GradScalerConfig::default())?;
/// scaler.load_state_dict(&GradScalerState::from_json(json)?)?;
/// assert_eq!((scaler.get_scale()?, scaler.growth_tracker()?), (32768.0, 17));
/// assert!(scaler.state_dict()?.to_json().contains("\"_growth_tracker\":17"));
/// # Ok::<(), tch_fabric::Error>(())
/// ```
///
/// Serialised to JSON it is exactly what `torch.amp.GradScaler().state_dict()` holds, so
/// `scaler.load_state_dict(json.load(f))` in Python accepts it, and a state written by Python
/// loads here. Fields are optional because PyTorch's state can be empty (a disabled scaler) or
/// come from a file with keys missing; [`GradScaler::load_state_dict`](crate::GradScaler::load_state_dict)
/// refuses both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
// Only a JSON object is a state dict: serde's derive alone would also take a bare list.
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct GradScalerState {
    /// The current scale.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scale: Option<f64>,
    /// `growth_factor`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub growth_factor: Option<f64>,
    /// `backoff_factor`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backoff_factor: Option<f64>,
    /// `growth_interval`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub growth_interval: Option<i64>,
    /// The number of clean steps since the last growth or back-off (`_growth_tracker`).
    #[serde(
        rename = "_growth_tracker",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub growth_tracker: Option<i64>,
}

/// The derived field-by-field form, reached only through a JSON object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    scale: Option<f64>,
    growth_factor: Option<f64>,
    backoff_factor: Option<f64>,
    growth_interval: Option<i64>,
    #[serde(rename = "_growth_tracker")]
    growth_tracker: Option<i64>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for GradScalerState {
    type Error = serde_json::Error;

    fn try_from(map: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        let raw: RawState = serde_json::from_value(serde_json::Value::Object(map))?;
        Ok(GradScalerState {
            scale: raw.scale,
            growth_factor: raw.growth_factor,
            backoff_factor: raw.backoff_factor,
            growth_interval: raw.growth_interval,
            growth_tracker: raw.growth_tracker,
        })
    }
}

impl GradScalerState {
    /// Whether no key is set (a disabled scaler's state).
    pub fn is_empty(&self) -> bool {
        *self == GradScalerState::default()
    }

    /// Parses PyTorch's JSON form.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Json`] for malformed JSON, wrong-typed values or unknown keys.
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// PyTorch's JSON form. (Non-finite numbers, which no valid state holds, become `null`.)
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}
