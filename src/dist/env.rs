//! [`DistEnv`]: the rendezvous variables of the launchers (torchrun and `fabric run`, or
//! SLURM's `srun`), read and checked.
use crate::error::{Error, Result};

/// The rendezvous variables torchrun and `fabric run --devices N` set for every rank.
///
/// ```
/// use tch_fabric::dist::DistEnv;
/// let env = DistEnv::from_vars(|k| match k {
///     "RANK" => Some("1".into()),
///     "WORLD_SIZE" => Some("2".into()),
///     "MASTER_PORT" => Some("29500".into()),
///     _ => None,
/// })?
/// .expect("a rank of a group");
/// assert_eq!((env.rank, env.local_rank, env.world_size), (1, 1, 2));
/// assert_eq!(env.master_addr, "127.0.0.1");
/// # Ok::<(), tch_fabric::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process's index among all processes.
    pub rank: usize,
    /// `LOCAL_RANK`: its index on this machine (the CUDA device it uses); `RANK` when unset.
    pub local_rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub world_size: usize,
    /// `MASTER_ADDR`: where rank 0 serves the rendezvous (default `127.0.0.1`).
    pub master_addr: String,
    /// `MASTER_PORT`: the rendezvous port.
    pub master_port: u16,
    /// Set when torchrun's agent serves the rendezvous store itself
    /// (`TORCHELASTIC_USE_AGENT_STORE=True`, PyTorch 2.13's torchrun): every rank then joins it
    /// as a client, rank 0 included, under the key prefix of this attempt
    /// (`TORCHELASTIC_RESTART_COUNT`, 0 when unset).
    pub agent_store: Option<u32>,
}

impl DistEnv {
    /// Reads the variables from the process environment; `Ok(None)` when not launched as a
    /// group. Two launchers are understood:
    ///
    /// - torchrun and `fabric run` (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
    ///   `MASTER_PORT`), used whenever `WORLD_SIZE` is set;
    /// - SLURM's `srun` otherwise, as Lightning's `SLURMEnvironment` reads it: `SLURM_NTASKS`
    ///   set and `SLURM_JOB_NAME` not `bash` or `interactive`; rank `SLURM_PROCID`, local rank
    ///   `SLURM_LOCALID`, world size `SLURM_NTASKS`; `MASTER_ADDR`, else the first host of
    ///   `SLURM_NODELIST`; `MASTER_PORT`, else 15000 plus the last four digits of
    ///   `SLURM_JOB_ID` (12910 without one). Lightning checks SLURM first; here the explicit
    ///   `WORLD_SIZE` wins, so `fabric run` or torchrun inside an `sbatch` script (which sets
    ///   `SLURM_NTASKS` for the whole job) still gives each process its own rank.
    ///
    /// # Errors
    ///
    /// [`Error::Distributed`] when a variable is set but malformed or missing.
    pub fn from_env() -> Result<Option<DistEnv>> {
        // A variable that is set but not UTF-8 is an error, not an absent variable.
        let bad = std::cell::RefCell::new(None);
        let env = Self::from_vars(|k| match env_var(k) {
            Ok(v) => v,
            Err(e) => {
                bad.borrow_mut().get_or_insert(e);
                None
            }
        });
        match bad.into_inner() {
            Some(e) => Err(e),
            None => env,
        }
    }

    /// [`DistEnv::from_env`] over any source of variables (for tests and custom launchers).
    ///
    /// # Errors
    ///
    /// As [`DistEnv::from_env`].
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Self::from_slurm(&get);
        };
        let num = |name: &str, v: &str| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| {
                Error::Distributed(format!("{name}={v:?} is not a non-negative integer"))
            })
        };
        let world_size = num("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(Error::Distributed(
                "WORLD_SIZE=0: must be at least 1".into(),
            ));
        }
        let rank = match get("RANK") {
            Some(v) => num("RANK", &v)?,
            None => {
                return Err(Error::Distributed(
                    "WORLD_SIZE is set but RANK is not: launch with `fabric run --devices N` \
                     or torchrun, which set both"
                        .into(),
                ))
            }
        };
        if rank >= world_size {
            return Err(Error::Distributed(format!(
                "RANK={rank} is outside WORLD_SIZE={world_size} (ranks are 0..{world_size})"
            )));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| "127.0.0.1".to_string());
        let master_port = match get("MASTER_PORT") {
            Some(v) => port(&v)?,
            None if world_size == 1 => 0,
            None => {
                return Err(Error::Distributed(
                    "MASTER_PORT is not set: every rank needs the rendezvous port".into(),
                ))
            }
        };
        // PyTorch compares with str(True), exactly.
        let agent_store = match get("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
            Some("True") => Some(match get("TORCHELASTIC_RESTART_COUNT") {
                Some(v) => v.trim().parse::<u32>().map_err(|_| {
                    Error::Distributed(format!(
                        "TORCHELASTIC_RESTART_COUNT={v:?} is not a non-negative integer"
                    ))
                })?,
                None => 0,
            }),
            _ => None,
        };
        Ok(Some(DistEnv {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
            agent_store,
        }))
    }
}

impl DistEnv {
    /// The SLURM half of [`DistEnv::from_vars`].
    fn from_slurm(get: &impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let Some(ntasks) = get("SLURM_NTASKS") else {
            return Ok(None);
        };
        if matches!(
            get("SLURM_JOB_NAME").as_deref(),
            Some("bash" | "interactive")
        ) {
            // An interactive allocation: not launched by srun (Lightning's
            // `_is_slurm_interactive_mode`).
            return Ok(None);
        }
        let num = |name: &str| -> Result<usize> {
            let v = get(name).ok_or_else(|| {
                Error::Distributed(format!(
                    "SLURM_NTASKS is set but {name} is not: start every task with srun"
                ))
            })?;
            v.trim().parse::<usize>().map_err(|_| {
                Error::Distributed(format!("{name}={v:?} is not a non-negative integer"))
            })
        };
        let world_size = ntasks
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::Distributed(format!("SLURM_NTASKS={ntasks:?} is not a positive integer"))
            })?;
        if world_size > 1 && get("SLURM_NTASKS_PER_NODE").is_none() {
            return Err(Error::Distributed(format!(
                "You set `--ntasks={world_size}` in your SLURM bash script, but this variable \
                 is not supported. HINT: Use `--ntasks-per-node={world_size}` instead."
            )));
        }
        let rank = num("SLURM_PROCID")?;
        let local_rank = num("SLURM_LOCALID")?;
        if rank >= world_size {
            return Err(Error::Distributed(format!(
                "SLURM_PROCID={rank} is outside SLURM_NTASKS={world_size}"
            )));
        }
        let master_addr = match get("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
            Some(a) => a,
            None => {
                let list = get("SLURM_NODELIST").unwrap_or_else(|| "127.0.0.1".into());
                let root = root_node(&list);
                if root.trim().is_empty() {
                    return Err(Error::Distributed(format!(
                        "SLURM_NODELIST={list:?} names no host: set MASTER_ADDR"
                    )));
                }
                root
            }
        };
        let master_port = match get("MASTER_PORT") {
            Some(v) => port(&v)?,
            None => match get("SLURM_JOB_ID") {
                Some(id) => {
                    // Python's `job_id[-4:]`, by characters.
                    let n = id.chars().count();
                    let tail: String = id.chars().skip(n.saturating_sub(4)).collect();
                    let n: u16 = tail
                        .trim()
                        .parse()
                        .ok()
                        .filter(|&n: &u16| n < 10_000)
                        .ok_or_else(|| {
                            Error::Distributed(format!(
                                "SLURM_JOB_ID={id:?} does not end in digits"
                            ))
                        })?;
                    15000 + n
                }
                None => 12910,
            },
        };
        Ok(Some(DistEnv {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
            agent_store: None,
        }))
    }
}

/// A `MASTER_PORT` value.
fn port(v: &str) -> Result<u16> {
    v.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            Error::Distributed(format!("MASTER_PORT={v:?} is not a TCP port (1..65535)"))
        })
}

/// The first host of a SLURM node list (`node[03-05,07],gpu1` is `node03`), by Lightning's
/// `resolve_root_node_address`, rule for rule.
fn root_node(nodes: &str) -> String {
    use std::sync::OnceLock;
    static RANGE: OnceLock<Option<regex::Regex>> = OnceLock::new();
    static SINGLE: OnceLock<Option<regex::Regex>> = OnceLock::new();
    let range = RANGE.get_or_init(|| regex::Regex::new(r"\[(.*?)[,-].*\]").ok());
    let single = SINGLE.get_or_init(|| regex::Regex::new(r"\[(.*?)\]").ok());
    let mut s = nodes.to_string();
    if let Some(re) = range {
        s = re.replace_all(&s, "$1").into_owned();
    }
    if let Some(re) = single {
        s = re.replace_all(&s, "$1").into_owned();
    }
    let first = s.split(' ').next().unwrap_or("");
    first.split(',').next().unwrap_or("").to_string()
}

/// The environment variable `name`: `None` when unset, an error naming it when it is set but
/// not UTF-8 (which `std::env::var(..).ok()` would take for unset, silently running with
/// defaults).
///
/// # Errors
///
/// [`Error::InvalidConfig`] for a value that is not UTF-8.
pub(crate) fn env_var(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => Err(Error::InvalidConfig {
            field: "environment variable",
            value: format!("{name}={}", raw.to_string_lossy()),
            allowed: "UTF-8 text",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn env_is_validated() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
        let err = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("outside WORLD_SIZE=2"), "{err}");
        let err = DistEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("MASTER_PORT is not set"), "{err}");
        let err = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_PORT", "70000"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a TCP port"), "{err}");
    }
}
