//! c10d process groups (TCPStore rendezvous, Gloo or NCCL) and DDP Reducers, owned by Rust
//! handles that free them on drop.
use super::{call, ptr, ptrs};
use crate::error::{Error, Result};
use crate::ffi;
use std::ffi::{c_char, c_void, CString};
use tch::Tensor;

/// How the shim's all-reduce combines values (`tf_pg_all_reduce`'s `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawReduceOp {
    Sum = 0,
    Max = 1,
}

/// The rendezvous and timeouts of one [`RawProcessGroup::new`].
#[derive(Debug)]
pub(crate) struct PgConfig<'a> {
    pub backend: &'a str,
    pub master_addr: &'a str,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    pub rendezvous_timeout_ms: i64,
    pub timeout_ms: i64,
    /// On rank 0, a listening socket bound to the master address, handed to the store (which
    /// then owns it); `None` lets c10d bind the port itself, on every interface.
    pub listener: Option<std::net::TcpListener>,
    /// torchrun's restart count when its agent serves the store: every rank joins as a client.
    pub agent_store: Option<u32>,
}

/// An owned c10d process group from the shim (`tf_process_group`), freed on drop.
#[derive(Debug)]
pub(crate) struct RawProcessGroup(*mut c_void);

impl RawProcessGroup {
    pub(crate) fn new(c: PgConfig<'_>) -> Result<Self> {
        let cstr = |field: &'static str, v: &str| {
            CString::new(v).map_err(|_| Error::InvalidConfig {
                field,
                value: v.escape_debug().to_string(),
                allowed: "a string without NUL bytes",
            })
        };
        let backend = cstr("backend", c.backend)?;
        let addr = cstr("MASTER_ADDR", c.master_addr)?;
        let int = |field: &'static str, v: usize| {
            i32::try_from(v).map_err(|_| Error::InvalidConfig {
                field,
                value: v.to_string(),
                allowed: "at most 2147483647",
            })
        };
        let (rank, world_size) = (int("RANK", c.rank)?, int("WORLD_SIZE", c.world_size)?);
        // From here the shim owns the socket: it gives it to the store or closes it.
        let listen_fd = c.listener.map_or(-1, std::os::fd::IntoRawFd::into_raw_fd);
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the strings are NUL-terminated and alive for the call; `out` receives the group.
        call("c10d process group", || unsafe {
            ffi::tf_pg_new(
                backend.as_ptr(),
                addr.as_ptr(),
                i32::from(c.master_port),
                rank,
                world_size,
                c.rendezvous_timeout_ms,
                c.timeout_ms,
                listen_fd,
                c.agent_store.map_or(-1, i64::from),
                &mut out,
            )
        })?;
        Ok(RawProcessGroup(out))
    }

    pub(crate) fn all_reduce(&self, t: &Tensor, op: RawReduceOp) -> Result<()> {
        // SAFETY: a live group and tensor.
        call("all_reduce", || unsafe {
            ffi::tf_pg_all_reduce(self.0, ptr(t), op as i32)
        })
    }

    pub(crate) fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let root = i32::try_from(root).map_err(|_| Error::InvalidConfig {
            field: "broadcast root",
            value: root.to_string(),
            allowed: "a rank of the group",
        })?;
        // SAFETY: a live group and tensor.
        call("broadcast", || unsafe {
            ffi::tf_pg_broadcast(self.0, ptr(t), root)
        })
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        call("barrier", || unsafe { ffi::tf_pg_barrier(self.0) })
    }

    /// After a failed collective: the ranks that never entered it ("" when every rank did or
    /// the store cannot tell).
    pub(crate) fn missing_ranks(&self) -> String {
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: a live group; `out` receives a strdup'ed string on success.
        match call("missing ranks", || unsafe {
            ffi::tf_pg_missing_ranks(self.0, &mut out)
        }) {
            // SAFETY: a strdup'ed string the shim handed over.
            Ok(()) => unsafe { ffi::take_string(out) },
            Err(_) => String::new(),
        }
    }

    /// The bucket all-reduces this group's Reducers issued.
    pub(crate) fn bucket_all_reduces(&self) -> u64 {
        // SAFETY: a live group.
        unsafe { ffi::tf_pg_bucket_all_reduces(self.0) }
    }

    /// libtorch's DDP Reducer over `params` in this group.
    pub(crate) fn reducer(
        &self,
        params: &[(String, Tensor)],
        bucket_bytes: usize,
        find_unused: bool,
    ) -> Result<RawReducer> {
        let names = params
            .iter()
            .map(|(n, _)| {
                CString::new(n.as_str()).map_err(|_| Error::native("Reducer", "NUL in a name"))
            })
            .collect::<Result<Vec<_>>>()?;
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let tensors = ptrs(params.iter().map(|(_, t)| t));
        let bytes = i64::try_from(bucket_bytes).unwrap_or(i64::MAX);
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: `tensors` and `name_ptrs` hold one entry per parameter, the names live for the
        // call; `out` receives the reducer.
        call("Reducer", || unsafe {
            ffi::tf_reducer_new(
                self.0,
                tensors.as_ptr(),
                tensors.len(),
                name_ptrs.as_ptr(),
                bytes,
                i32::from(find_unused),
                &mut out,
            )
        })?;
        if out.is_null() {
            return Err(Error::native("Reducer", "the shim returned no reducer"));
        }
        Ok(RawReducer(out))
    }
}

/// A `c10d::Reducer` the shim owns.
#[derive(Debug)]
pub(crate) struct RawReducer(*mut c_void);

impl RawReducer {
    /// Arms the hooks for the next backward (`outputs` are searched for unused parameters
    /// when the reducer was built to find them).
    pub(crate) fn prepare(&self, outputs: &[&Tensor]) -> Result<()> {
        let p = ptrs(outputs.iter().copied());
        // SAFETY: a live reducer; `p` holds `p.len()` live tensors.
        call("DDP Reducer", || unsafe {
            ffi::tf_reducer_prepare(self.0, p.as_ptr(), p.len())
        })
    }
}

impl Drop for RawReducer {
    fn drop(&mut self) {
        // SAFETY: from tf_reducer_new, freed once; the shim swallows a throwing destructor.
        unsafe { ffi::tf_reducer_free(self.0) }
    }
}

impl Drop for RawProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the pointer came from tf_pg_new and is freed exactly once; the shim swallows
        // any exception thrown while closing sockets.
        unsafe { ffi::tf_pg_free(self.0) }
    }
}
