//! Which Fabric set up which VarStore: a VarStore converted for one Fabric's precision and
//! device is refused by another, whose conversions and checkpoints would silently disagree with
//! the first's.
use super::Shared;
use crate::error::{Error, Result};
use std::sync::{Arc, Mutex, Weak};
use tch::nn;

impl Drop for Shared {
    fn drop(&mut self) {
        // The VarStores this Fabric converted may be set up by another Fabric now.
        if let Ok(mut owners) = OWNERS.lock() {
            owners.retain(|(w, id)| *id != self.id && w.strong_count() > 0);
        }
    }
}

type Variables = Mutex<nn::Variables>;

/// Which Fabric set up which VarStore (by its variables' shared list): a VarStore converted for
/// one Fabric's precision and device is refused by another, whose conversions and checkpoints
/// would silently disagree with the first's.
static OWNERS: Mutex<Vec<(Weak<Variables>, u64)>> = Mutex::new(Vec::new());

/// Records `vars` as set up by Fabric `fabric` (true when it was not yet), or refuses it if
/// another Fabric did.
pub(super) fn claim(vars: &Arc<Variables>, fabric: u64) -> Result<bool> {
    let mut owners = OWNERS
        .lock()
        .map_err(|_| Error::Usage("the VarStore registry's lock is poisoned".into()))?;
    owners.retain(|(w, _)| w.strong_count() > 0);
    let owner = owners
        .iter()
        .find(|(w, _)| w.upgrade().is_some_and(|a| Arc::ptr_eq(&a, vars)))
        .map(|(_, id)| *id);
    match owner {
        Some(id) if id != fabric => Err(Error::Usage(
            "this VarStore was set up by another Fabric, which converted it for its own precision \
             and device: give each Fabric its own VarStore"
                .into(),
        )),
        Some(_) => Ok(false),
        None => {
            owners.push((Arc::downgrade(vars), fabric));
            Ok(true)
        }
    }
}

/// Forgets a claim whose setup failed.
pub(super) fn release(vars: &Arc<Variables>) {
    if let Ok(mut owners) = OWNERS.lock() {
        owners.retain(|(w, _)| !w.upgrade().is_some_and(|a| Arc::ptr_eq(&a, vars)));
    }
}
