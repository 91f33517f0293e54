//! Crash-safe file I/O for both checkpoint formats: a save writes a temporary sibling of the
//! target, syncs it, reads it back and renames it over the target (through symbolic links: the
//! link stays, its target is replaced); temporary files of saves killed mid-way are removed by
//! the next save there. Reads open only regular files (a FIFO or a device is refused without
//! blocking).
use super::{fail, io};
use crate::error::{Error, Result};
use crate::native;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where a save to `path` really writes: the end of its chain of symbolic links (so the link
/// stays and its target is replaced), or `path` itself. Refuses to replace anything but a
/// regular file.
pub(super) fn resolve_target(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    // Linux's own limit on links followed in one lookup (MAXSYMLINKS).
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&p).map_err(io(path))?;
                p = match p.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                };
            }
            Ok(m) if m.is_file() => return Ok(p),
            Ok(m) => {
                return Err(fail(
                    path,
                    format!(
                        "{} is {}, not a regular file: refusing to replace it with a checkpoint",
                        p.display(),
                        file_kind(&m.file_type())
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(io(path)(e)),
        }
    }
    Err(fail(path, "too many levels of symbolic links"))
}

pub(super) fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Numbers the temporary files of this process, so that two threads saving to one path at
/// once never write the same temporary file.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The marker in temporary file names: `.<name>.tmp-<pid>-<n>` (`.<name>.tmp-<pid>` before).
const TMP_MARK: &str = ".tmp-";

/// The pid in the name of a temporary file this crate writes, if `name` is one.
fn tmp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(TMP_MARK)?;
    let pid = match tail.split_once('-') {
        Some((pid, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => pid,
        Some(_) => return None,
        None => tail,
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Removes the temporary files that saves killed mid-way (by another process, now gone) left
/// in `dir`. Files of live processes, of this process, and anything else are left alone.
/// (Processes of another PID namespace sharing the folder look gone: their saves are not told
/// apart, so do not share a checkpoint folder across containers while both save.)
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(tmp_owner) else {
            continue;
        };
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular && pid != me && !native::may_be_alive(pid) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => log::info!(
                    "removed {}, left by an interrupted save of process {pid}",
                    entry.path().display()
                ),
                Err(e) => log::debug!("cannot remove {}: {e}", entry.path().display()),
            }
        }
    }
}

/// Runs `produce` on a temporary sibling of the target, syncs it, reads it back
/// ([`verify`]) and renames it over the target (the end of `path`'s symbolic links), so a
/// crash at any point leaves either the old file or the new one, never a mix, and a file that
/// does not read back never replaces a good one.
pub(super) fn write_atomic(
    path: &Path,
    produce: impl FnOnce(&Path) -> Result<()>,
    read_back: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let target = resolve_target(path)?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| fail(path, "the path names no file"))?
        .to_string_lossy()
        .into_owned();
    remove_stale_temps(&dir);
    let tmp = dir.join(format!(
        ".{name}{TMP_MARK}{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        produce(&tmp)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(path))?;
        read_back(&tmp).map_err(|e| not_read_back(path, e))?;
        // Keep the permissions of the file being replaced (a private checkpoint stays private).
        if let Ok(old) = std::fs::metadata(&target) {
            let _ = std::fs::set_permissions(&tmp, old.permissions());
        }
        std::fs::rename(&tmp, &target).map_err(io(path))?;
        // Make the rename itself durable; a folder that cannot be opened is no reason to fail.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The error of a file just written that does not read back, reported for `path`.
pub(super) fn not_read_back(path: &Path, e: Error) -> Error {
    match e {
        Error::Checkpoint { reason, .. } => fail(
            path,
            format!(
                "the file written does not read back ({reason}); the previous checkpoint is kept"
            ),
        ),
        Error::Io { source, .. } => io(path)(source),
        other => other,
    }
}

/// Opens `path` for reading if it is a regular file. A FIFO is opened without blocking and
/// refused like a device or a folder, so that no read waits forever or never ends.
pub(super) fn open_regular(path: &Path) -> Result<(std::fs::File, u64)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io(path))?;
    let m = file.metadata().map_err(io(path))?;
    if !m.is_file() {
        return Err(fail(
            path,
            format!(
                "{} cannot be a checkpoint, which is a regular file written by Fabric::save",
                file_kind(&m.file_type())
            ),
        ));
    }
    Ok((file, m.len()))
}
