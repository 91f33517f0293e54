//! The parameters an optimizer updates ([`Params`]: names and tensors in PyTorch's order) and
//! their gradients at one step ([`GradBatch`]: fetched in one native call and grouped by
//! (device, dtype) once, then handed through clipping, the scaler and the optimizer).
use crate::error::{Error, Result};
use crate::native::{self, Meta};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

/// Indices grouped by key in first-seen order (`None`: left out), as PyTorch groups tensors per
/// device and dtype for one fused kernel call each. The crate's one grouping helper.
pub(crate) fn group_by<K: PartialEq>(
    keys: impl IntoIterator<Item = Option<K>>,
) -> Vec<(K, Vec<usize>)> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let Some(key) = key else { continue };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The parameters one optimizer updates: names and tensors (shallow handles sharing storage with
/// the VarStore's), in PyTorch's order, plus an identity that the scaler keys its per-optimizer
/// state by (PyTorch keys it by `id(optimizer)`).
///
/// ```
/// use tch::{nn, Device};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _layer = nn::linear(vs.root() / "fc", 4, 2, Default::default());
/// let params = tch_fabric::optim::Params::from_var_store(&vs)?;
/// // PyTorch's order: a module's weight, then its bias (tch creates the bias first).
/// assert_eq!(params.names(), ["fc.weight", "fc.bias"]);
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug)]
pub struct Params {
    id: u64,
    names: Vec<String>,
    tensors: Vec<Tensor>,
    /// The other names of each parameter (a tied weight registered twice in its VarStore).
    aliases: Vec<Vec<String>>,
    /// The positions of the parameters in the order the list was made in (param groups
    /// reorder it).
    model_order: Vec<usize>,
}

impl Params {
    /// The trainable variables of `vs`, in the order PyTorch gives the same modules'
    /// parameters: creation order, with a module's `weight` before its `bias` (tch's layers
    /// create the bias first; PyTorch registers the weight first). The order fixes the summation
    /// order of global norms, so clipping rounds as in PyTorch.
    ///
    /// A weight tied under two names (nanoGPT's `lm_head.weight` is `transformer.wte.weight`:
    /// the tensor added to the VarStore a second time, `vs.root().add("lm_head.weight",
    /// wte.shallow_clone(), false)`) is one parameter, as in PyTorch's `named_parameters()`:
    /// named by the first of its names in sorted order, the others kept as its aliases
    /// ([`Params::aliases`]), so its optimizer state exists once.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] if the VarStore's lock is poisoned; [`Error::Native`] if libtorch
    /// cannot describe a variable.
    pub fn from_var_store(vs: &nn::VarStore) -> Result<Params> {
        let vars = lock_vars(&vs.variables_)?;
        let trainable: Vec<Tensor> = vars
            .trainable_variables
            .iter()
            .map(|v| v.tensor.shallow_clone())
            .collect();
        let named: Vec<(&String, &Tensor)> = vars.named_variables.iter().collect();
        let named_ids = native::metas(named.iter().map(|(_, t)| *t))?;
        // Every name of each TensorImpl, sorted (a tied weight has several).
        let mut names_of: HashMap<usize, Vec<&String>> = HashMap::new();
        for (m, (n, _)) in named_ids.iter().zip(&named) {
            if let Some(m) = m {
                names_of.entry(m.id).or_default().push(n);
            }
        }
        for names in names_of.values_mut() {
            names.sort();
        }
        let mut out: Vec<(String, Tensor)> = Vec::with_capacity(trainable.len());
        let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
        for (t, m) in trainable.iter().zip(native::metas(&trainable)?) {
            let names = m
                .and_then(|m| names_of.get(&m.id))
                .ok_or_else(|| Error::native("VarStore", "a trainable variable has no name"))?;
            let Some((first, others)) = names.split_first() else {
                return Err(Error::native(
                    "VarStore",
                    "a trainable variable has no name",
                ));
            };
            if out.iter().any(|(n, _)| n == *first) {
                continue;
            }
            aliases.insert(
                (*first).clone(),
                others.iter().map(|n| (*n).clone()).collect(),
            );
            out.push(((*first).clone(), t.shallow_clone()));
        }
        drop(vars);
        for i in 1..out.len() {
            let (prev, cur) = (&out[i - 1].0, &out[i].0);
            if let (Some(p), Some(c)) = (prev.strip_suffix("bias"), cur.strip_suffix("weight")) {
                if p == c {
                    out.swap(i - 1, i);
                }
            }
        }
        let mut params = Params::new(out)?;
        params.aliases = params
            .names
            .iter()
            .map(|n| aliases.remove(n).unwrap_or_default())
            .collect();
        Ok(params)
    }

    /// An explicit list of named parameters, in the order given.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] for an undefined tensor, a name given twice, or one tensor given under
    /// two names (PyTorch warns and then updates it twice a step; a tied weight is one
    /// parameter, as [`Params::from_var_store`] lists it).
    pub fn new(named: Vec<(String, Tensor)>) -> Result<Params> {
        let metas = native::metas(named.iter().map(|(_, t)| t))?;
        let mut names: HashSet<&str> = HashSet::with_capacity(named.len());
        let mut tensors: HashMap<usize, &str> = HashMap::with_capacity(named.len());
        for ((name, _), m) in named.iter().zip(&metas) {
            let Some(m) = m else {
                return Err(Error::Usage(format!(
                    "parameter '{name}' is an undefined tensor"
                )));
            };
            if !names.insert(name) {
                return Err(Error::Usage(format!("parameter '{name}' is listed twice")));
            }
            if let Some(first) = tensors.insert(m.id, name) {
                return Err(Error::Usage(format!(
                    "parameters '{first}' and '{name}' are the same tensor: an optimizer would \
                     update it twice a step; list it once"
                )));
            }
        }
        let (names, tensors): (Vec<String>, Vec<Tensor>) = named.into_iter().unzip();
        Ok(Params {
            id: next_id(),
            aliases: vec![Vec::new(); names.len()],
            model_order: (0..names.len()).collect(),
            names,
            tensors,
        })
    }

    /// The same parameters in another order: `order[k]` is the position of the parameter that
    /// goes to position `k` (a permutation of `0..len()`, which the caller guarantees).
    pub(crate) fn reorder(&mut self, order: &[usize]) {
        self.names = order.iter().map(|&i| self.names[i].clone()).collect();
        self.tensors = order
            .iter()
            .map(|&i| self.tensors[i].shallow_clone())
            .collect();
        self.aliases = order.iter().map(|&i| self.aliases[i].clone()).collect();
        let mut at = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            at[old] = new;
        }
        self.model_order = self.model_order.iter().map(|&old| at[old]).collect();
    }

    /// The positions of the parameters in the order the list was made in: the model's
    /// `parameters()` order, which param groups change into the optimizer's (group after
    /// group).
    pub fn model_order(&self) -> &[usize] {
        &self.model_order
    }

    /// The other names of parameter `i`: a weight tied under several names in its VarStore
    /// has one parameter, named [`Params::names`]`()[i]`, and these.
    pub fn aliases(&self, i: usize) -> &[String] {
        self.aliases.get(i).map_or(&[], Vec::as_slice)
    }

    /// Whether `name` is parameter `i`'s name or one of its aliases.
    pub(crate) fn is_named(&self, i: usize, name: &str) -> bool {
        self.names.get(i).is_some_and(|n| n == name) || self.aliases(i).iter().any(|a| a == name)
    }

    /// This list's identity (unique in the process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The parameter names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The parameter tensors.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The number of parameters.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The gradients as they are now, fetched in one native call and grouped by (device,
    /// dtype).
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch cannot hand out a gradient.
    pub fn grads(&self) -> Result<GradBatch> {
        let (grads, params) = native::collect_grads(&self.tensors)?;
        Ok(GradBatch::new(grads, Some(params)))
    }

    /// `zero_grad(set_to_none=True)`: every gradient becomes undefined, so its memory is free
    /// until the next backward.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch refuses.
    pub fn zero_grad(&self) -> Result<()> {
        native::grads_set_to_none(&self.tensors)
    }
}

/// A VarStore's variables, locked (tch's own accessors panic on a poisoned lock).
pub(crate) fn lock_vars(vars: &Mutex<nn::Variables>) -> Result<MutexGuard<'_, nn::Variables>> {
    vars.lock().map_err(|_| {
        Error::Usage("a VarStore's lock is poisoned: a thread panicked while holding it".into())
    })
}

/// Gradients of one (device, dtype): indices into the [`GradBatch`] (= into the [`Params`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GradGroup {
    /// Their device.
    pub device: Device,
    /// Their dtype.
    pub kind: Kind,
    /// Their positions, in parameter order.
    pub indices: Vec<usize>,
}

/// The gradients of a [`Params`] at one step: one entry per parameter (`None` for a parameter
/// without a gradient, which every step leaves out, as PyTorch does), grouped by (device,
/// dtype) in first-seen order. Fetched in one native call together with what the step needs
/// to know of the tensors (device, dtype, layout), which is then never asked again.
#[derive(Debug)]
pub struct GradBatch {
    grads: Vec<Option<(Tensor, Meta)>>,
    groups: Vec<GradGroup>,
    /// The devices of the groups, in first-seen order.
    devices: Vec<Device>,
    /// The parameters' own metadata, when the batch was fetched from them.
    params: Option<Vec<Option<Meta>>>,
}

impl GradBatch {
    fn new(grads: Vec<Option<(Tensor, Meta)>>, params: Option<Vec<Option<Meta>>>) -> GradBatch {
        let groups: Vec<GradGroup> = group_by(
            grads
                .iter()
                .map(|g| g.as_ref().map(|(_, m)| (m.device, m.kind))),
        )
        .into_iter()
        .map(|((device, kind), indices)| GradGroup {
            device,
            kind,
            indices,
        })
        .collect();
        let mut devices: Vec<Device> = Vec::new();
        for g in &groups {
            if !devices.contains(&g.device) {
                devices.push(g.device);
            }
        }
        GradBatch {
            grads,
            groups,
            devices,
            params,
        }
    }

    /// Plain tensors taken as gradients (undefined ones are left out), for the free clipping
    /// functions.
    ///
    /// # Errors
    ///
    /// [`Error::Native`] if libtorch cannot describe a tensor.
    pub fn from_tensors(tensors: &[Tensor]) -> Result<GradBatch> {
        let metas = native::metas(tensors)?;
        Ok(GradBatch::new(
            tensors
                .iter()
                .zip(metas)
                .map(|(t, m)| m.map(|m| (t.shallow_clone(), m)))
                .collect(),
            None,
        ))
    }

    /// The number of entries (defined or not).
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether no gradient is defined.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The gradient at `index`, if defined.
    pub fn get(&self, index: usize) -> Option<&Tensor> {
        self.grads.get(index)?.as_ref().map(|(t, _)| t)
    }

    pub(crate) fn meta(&self, index: usize) -> Option<&Meta> {
        self.grads.get(index)?.as_ref().map(|(_, m)| m)
    }

    /// The (device, dtype) groups.
    pub fn groups(&self) -> &[GradGroup] {
        &self.groups
    }

    /// The gradients of one group.
    pub fn tensors(&self, group: &GradGroup) -> Vec<&Tensor> {
        group.indices.iter().filter_map(|&i| self.get(i)).collect()
    }

    /// Every group's gradients, group by group.
    pub fn grouped(&self) -> Vec<Vec<&Tensor>> {
        self.groups.iter().map(|g| self.tensors(g)).collect()
    }

    /// Every group's gradients, each group in the order of `order` (positions, a permutation
    /// of this batch's): the list PyTorch builds from parameters given in that order.
    pub(crate) fn grouped_in(&self, order: &[usize]) -> Vec<Vec<&Tensor>> {
        self.groups
            .iter()
            .map(|g| {
                order
                    .iter()
                    .filter(|i| g.indices.binary_search(i).is_ok())
                    .filter_map(|&i| self.get(i))
                    .collect()
            })
            .collect()
    }

    /// The defined gradients with their positions, in parameter order.
    pub fn defined(&self) -> impl Iterator<Item = (usize, &Tensor)> {
        self.grads
            .iter()
            .enumerate()
            .filter_map(|(i, g)| Some((i, &g.as_ref()?.0)))
    }

    /// The devices the gradients are on, in first-seen order.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Whether the parameters and gradients at `indices` are all contiguous (`None` when the
    /// batch was not fetched from parameters, so nothing is known of them).
    pub(crate) fn all_contiguous(&self, indices: &[usize]) -> Option<bool> {
        let params = self.params.as_ref()?;
        Some(indices.iter().all(|&i| {
            params
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|m| m.contiguous)
                && self.meta(i).is_some_and(|m| m.contiguous)
        }))
    }

    /// Whether a gradient is sparse.
    pub fn has_sparse(&self) -> bool {
        self.grads.iter().flatten().any(|(_, m)| m.sparse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_keeps_first_seen_order_and_skips_none() {
        let g = group_by([Some('a'), None, Some('b'), Some('a')]);
        assert_eq!(g, vec![('a', vec![0, 3]), ('b', vec![2])]);
    }

    #[test]
    fn params_in_pytorch_order_and_grads_grouped() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _a = nn::linear(&root / "a", 2, 3, Default::default());
        let _e = root.zeros("empty", &[0]);
        let _b = nn::linear(&root / "b", 3, 1, Default::default());
        let p = Params::from_var_store(&vs).unwrap();
        assert_eq!(
            p.names(),
            ["a.weight", "a.bias", "empty", "b.weight", "b.bias"]
        );
        let batch = p.grads().unwrap();
        assert!(batch.is_empty() && batch.len() == 5);
        let loss = p.tensors()[0].sum(Kind::Float) + p.tensors()[4].sum(Kind::Float);
        loss.backward();
        let batch = p.grads().unwrap();
        assert_eq!(batch.defined().map(|(i, _)| i).collect::<Vec<_>>(), [0, 4]);
        assert_eq!(batch.groups().len(), 1);
        assert_eq!(batch.groups()[0].indices, [0, 4]);
        assert!(Params::new(vec![("x".into(), Tensor::new())]).is_err());
    }
}
