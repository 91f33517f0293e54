//! [`Description`]: what a [`Fabric`] decided, as [`Fabric::describe`] returns it and its
//! `Display` prints it.
use super::Fabric;
use crate::error::Result;
use crate::precision::Precision;
use std::fmt;
use tch::{Device, Kind};

/// What a [`Fabric`] decided, as [`Fabric::describe`] returns it and its `Display` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// The precision as asked for (code, or `fabric run --precision`).
    pub requested: Precision,
    /// The precision that runs (different for `16-mixed` on CPU, which runs `bf16-mixed`
    /// unless [`crate::FabricBuilder::cpu_fp16_autocast`]).
    pub precision: Precision,
    /// The device training runs on.
    pub device: Device,
    /// The dtype the forward computes in under autocast (`None`: no autocast).
    pub autocast: Option<Kind>,
    /// The dtype parameters are kept in.
    pub param_dtype: Kind,
    /// Whether a GradScaler scales the loss, with its current scale.
    pub loss_scale: Option<f64>,
    /// Whether the process-wide default dtype switches around forwards
    /// ([`crate::FabricBuilder::process_wide_default_dtype`]).
    pub process_wide_default_dtype: bool,
    /// This process's rank, and the number of processes.
    pub rank: (usize, usize),
}

impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "precision {}", self.precision)?;
        if self.requested != self.precision {
            write!(
                f,
                " (requested {}: Lightning runs it as {} on this device; \
                 `cpu_fp16_autocast(true)` gives real float16)",
                self.requested, self.precision
            )?;
        }
        write!(
            f,
            ", device {:?}, parameters {:?}",
            self.device, self.param_dtype
        )?;
        match self.autocast {
            Some(k) => write!(f, ", autocast {k:?}")?,
            None => write!(f, ", no autocast")?,
        }
        match self.loss_scale {
            Some(s) => write!(f, ", GradScaler on (scale {s})")?,
            None => write!(f, ", no GradScaler")?,
        }
        if self.process_wide_default_dtype {
            write!(f, ", default dtype switched process-wide")?;
        }
        if self.rank.1 > 1 {
            write!(f, ", rank {} of {}", self.rank.0, self.rank.1)?;
        }
        Ok(())
    }
}

impl fmt::Display for Fabric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.describe() {
            Ok(d) => d.fmt(f),
            Err(e) => write!(f, "precision {} ({e})", self.precision()),
        }
    }
}

impl Fabric {
    /// What this Fabric decided: the precision as requested and as run, the device, the
    /// autocast dtype, whether a GradScaler runs (and its scale). `Display` prints the same.
    ///
    /// ```
    /// let fabric = tch_fabric::Fabric::builder().precision("16-mixed").accelerator("cpu").build()?;
    /// let d = fabric.describe()?;
    /// assert_eq!((d.requested.as_str(), d.precision.as_str()), ("16-mixed", "bf16-mixed"));
    /// assert!(fabric.to_string().contains("requested 16-mixed"));
    /// # Ok::<(), tch_fabric::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`crate::Error::Native`] if the loss scale cannot be read from the device.
    pub fn describe(&self) -> Result<Description> {
        let s = &self.shared.settings;
        Ok(Description {
            requested: s.requested,
            precision: s.precision,
            device: s.device,
            autocast: s.precision.autocast_dtype(),
            param_dtype: s.precision.param_dtype(),
            loss_scale: self.loss_scale_if_scaling()?,
            process_wide_default_dtype: s.default_dtype_scope,
            rank: (self.global_rank(), self.world_size()),
        })
    }

    fn loss_scale_if_scaling(&self) -> Result<Option<f64>> {
        let st = self.shared.state.borrow();
        st.scaler
            .is_enabled()
            .then(|| st.scaler.get_scale())
            .transpose()
    }
}
