//! One model's DDP engine: libtorch's `c10d::Reducer` over its parameters, with the names of
//! the parameters c10d reports by index.
use crate::error::{Error, Result};
use crate::native::RawReducer;
use tch::Tensor;

/// One model's [`ProcessGroup::reducer`].
#[derive(Debug)]
pub(crate) struct Reducer {
    pub(super) raw: RawReducer,
    /// The parameters' names, by the Reducer's indices.
    pub(super) names: Vec<String>,
}

impl Reducer {
    /// Arms the Reducer for the next backward: this backward's gradients are then averaged
    /// across the group while it runs. `outputs` (the loss) are searched for unused
    /// parameters when the reducer finds them.
    pub(crate) fn prepare(&self, outputs: &[&Tensor]) -> Result<()> {
        self.raw.prepare(outputs).map_err(|e| self.name_unused(e))
    }

    /// c10d names the parameters that got no gradient by index only (unless
    /// TORCH_DISTRIBUTED_DEBUG=DETAIL, a process-wide setting): adds their names.
    fn name_unused(&self, e: Error) -> Error {
        let Error::Native { op, message } = e else {
            return e;
        };
        const MARK: &str = "did not receive grad for rank ";
        let names: Vec<&str> = message
            .lines()
            .find_map(|l| l.split_once(MARK))
            .and_then(|(_, rest)| rest.split_once(':'))
            .map(|(_, list)| {
                list.split_whitespace()
                    .filter_map(|i| i.trim_matches(',').parse::<usize>().ok())
                    .filter_map(|i| self.names.get(i).map(String::as_str))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            return Error::Native { op, message };
        }
        Error::Native {
            op,
            message: format!(
                "{message}\nParameters without a gradient in the last backward: {}. Build the \
                 Fabric with FabricBuilder::find_unused_parameters(true) if the model leaves \
                 them unused on purpose.",
                names.join(", ")
            ),
        }
    }
}
