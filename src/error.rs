//! The crate's one error type.
use std::fmt;

/// Everything that can go wrong in tch-fabric. Each variant names what was wrong and, where
/// there is a rule, what is allowed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A precision value that is not one of Lightning's (the message lists them all, as
    /// Lightning's does, and suggests the closest for a typo).
    #[error(
        "Precision {value} is invalid. Allowed precision values: {allowed}{}",
        Suggestion(suggestion)
    )]
    InvalidPrecision {
        /// The value as given, quoted the way Lightning quotes it (`'fp16'`, `128`).
        value: String,
        /// Every value accepted, in Lightning's order.
        allowed: &'static str,
        /// The closest canonical value, when the input looks like a typo of one.
        suggestion: Option<&'static str>,
    },

    /// An autocast scope that libtorch cannot run (wrong dtype, device without autocast or
    /// without hardware).
    #[error("autocast on {device} with {dtype}: {reason}")]
    UnsupportedAutocast {
        /// The device asked for.
        device: String,
        /// The dtype asked for.
        dtype: String,
        /// Why it cannot run and what is allowed instead.
        reason: String,
    },

    /// A configuration value outside its allowed range.
    #[error("invalid {field} = {value}: must be {allowed}")]
    InvalidConfig {
        /// The configuration field.
        field: &'static str,
        /// The value given.
        value: String,
        /// The allowed range, in words.
        allowed: &'static str,
    },

    /// A state dict that cannot be loaded (nothing was changed).
    #[error("cannot load state: {0}")]
    InvalidState(String),

    /// A call made in the wrong order or on the wrong object, with PyTorch's message where
    /// PyTorch has one.
    #[error("{0}")]
    Usage(String),

    /// An error raised inside libtorch: a C++ exception caught by the shim, or an error tch
    /// reported. The message is libtorch's, without its C++ backtrace.
    #[error("libtorch error in {op}: {message}")]
    Native {
        /// The operation that failed (the shim entry point, ATen op or tch call).
        op: &'static str,
        /// libtorch's message.
        message: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint that cannot be written or read (missing, truncated, foreign, or not
    /// matching the model).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is wrong and, where possible, how to fix it.
        reason: String,
    },

    /// A multi-process run that cannot start or continue: a malformed or inconsistent
    /// rendezvous environment (`RANK`, `WORLD_SIZE`, `MASTER_PORT`, ...), or devices asked for
    /// without a launcher.
    #[error("distributed training: {0}")]
    Distributed(String),

    /// JSON that could not be parsed into the expected shape.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

struct Suggestion<'a>(&'a Option<&'static str>);

impl fmt::Display for Suggestion<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, ". Did you mean '{s}'?"),
            None => Ok(()),
        }
    }
}

impl Error {
    /// [`Error::Native`] for a message from libtorch, cut before the C++ backtrace c10 appends
    /// ("Exception raised from ... (most recent call first): frame #0 ...").
    pub(crate) fn native(op: &'static str, message: &str) -> Error {
        let message = match message.find("\nException raised from ") {
            Some(end) => &message[..end],
            None => message,
        };
        Error::Native {
            op,
            message: message.trim_end().to_string(),
        }
    }
}

/// Names the operation of a fallible tch call: `t.f_to_kind(k).op("to_kind")?`.
pub(crate) trait Op<T> {
    /// The error as [`Error::Native`] naming `op`, without libtorch's C++ backtrace.
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> Op<T> for std::result::Result<T, tch::TchError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|e| {
            let message = match &e {
                tch::TchError::Torch(m) => m.clone(),
                other => other.to_string(),
            };
            Error::native(op, &message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_messages_lose_the_cpp_backtrace() {
        let raw = "Expected all tensors to be on the same device\nException raised from \
                   check at aten/src/ATen/x.cpp:10 (most recent call first):\nframe #0: c10::f()";
        assert_eq!(
            Error::native("add", raw).to_string(),
            "libtorch error in add: Expected all tensors to be on the same device"
        );
        let e = tch::Tensor::f_zeros([2], (tch::Kind::Float, tch::Device::Cpu))
            .and_then(|a| a.f_mm(&a))
            .op("mm")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("libtorch error in mm: "), "{e}");
        assert!(!e.contains("frame #"), "{e}");
    }
}
