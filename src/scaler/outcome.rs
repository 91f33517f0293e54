//! [`StepOutcome`]: what one scaled optimizer step did.

/// What [`crate::GradScaler::step`] did.
///
/// ```
/// # use tch_fabric::StepOutcome;
/// # let outcome = StepOutcome::Skipped { scale_before: 65536.0, scale_after: 32768.0, consecutive: 1, nonfinite: vec![] };
/// match outcome {
///     StepOutcome::Stepped => {}
///     StepOutcome::Skipped { scale_before, scale_after, consecutive, .. } => {
///         println!("overflow: skipped ({consecutive} in a row), scale {scale_before} -> {scale_after}")
///     }
///     StepOutcome::Queued => {} // decided on the device; see GradScaler::steps_skipped
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The optimizer stepped.
    Stepped,
    /// Gradients held inf/NaN: the optimizer did not step and no parameter changed.
    Skipped {
        /// The scale this iteration used.
        scale_before: f64,
        /// The scale the next [`crate::GradScaler::update`] will set.
        scale_after: f64,
        /// Steps skipped in a row, this one included (see
        /// [`crate::GradScalerConfig::warn_after_skips`]).
        consecutive: u64,
        /// Parameters whose gradients were not finite, when
        /// [`crate::GradScalerConfig::diagnose_skips`] is on (empty otherwise).
        nonfinite: Vec<String>,
    },
    /// A fused optimizer's step was queued on the device together with its skip decision
    /// (see [`crate::GradScalerConfig::sync_free`]): nothing was read back to the host, so
    /// whether it was skipped is not known yet. [`crate::GradScaler::steps_skipped`] counts it
    /// when read.
    Queued,
}

impl StepOutcome {
    /// Whether the step is known to have been skipped ([`StepOutcome::Queued`] is not).
    pub fn is_skipped(&self) -> bool {
        matches!(self, StepOutcome::Skipped { .. })
    }
}
