//! The one question asked of the operating system directly: is a process still running.

/// Whether process `pid` may still be running (and so may still be writing a file). Unsure
/// means yes.
pub(crate) fn may_be_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        if pid <= 0 {
            return true;
        }
        // SAFETY: signal 0 only checks that the process exists; pid > 0 addresses exactly
        // one process (never a group).
        let r = unsafe { libc::kill(pid, 0) };
        !(r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}
