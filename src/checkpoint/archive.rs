//! The zip container of a torch.save file, read through its own directory: the pickle read
//! whole, and the bytes libtorch read for every record checked against the size and CRC-32 the
//! directory gives it.
//!
//! libtorch's reader (miniz, built without its CRC checks) reads what the archive holds, damaged
//! or not; Python's `zipfile` would name the damaged entry. Here a load that used a damaged
//! record fails, naming it, and returns nothing.

use super::{fail, io};
use crate::error::Result;
use std::io::{ErrorKind, Read};
use std::path::Path;

/// The largest `data.pkl` read. A state dict's pickle holds names and shapes, about 100 bytes a
/// tensor (a model of a million tensors: ~100 MiB); more is a decompression bomb, refused before
/// it is inflated.
pub(crate) const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// A torch.save archive's directory.
pub(crate) struct Archive<'p> {
    path: &'p Path,
    zip: zip::ZipArchive<std::fs::File>,
    /// The folder every record sits in (`archive/`), as libtorch's reader finds it: the first
    /// entry's name up to its first `/`.
    prefix: String,
}

impl<'p> Archive<'p> {
    /// Opens the archive's directory (its entries' names, sizes and checksums; no contents).
    pub(crate) fn open(path: &'p Path) -> Result<Self> {
        let (file, _) = super::atomic::open_regular(path)?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| fail(path, format!("not a readable torch.save archive: {e}")))?;
        let first = zip
            .by_index_raw(0)
            .map_err(|e| fail(path, format!("not a readable torch.save archive: {e}")))?
            .name()
            .to_string();
        let prefix = match first.find('/') {
            Some(i) => first[..=i].to_string(),
            None => {
                return Err(fail(
                    path,
                    format!("not a torch.save archive: its first entry '{first}' is in no folder"),
                ))
            }
        };
        Ok(Self { path, zip, prefix })
    }

    /// Record `name` (`data.pkl`), whole, after checking its size and checksum.
    pub(crate) fn read(&mut self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.stream(name, limit, |chunk| bytes.extend_from_slice(chunk))?;
        Ok(bytes)
    }

    /// Reads record `name` through to check its checksum, keeping nothing.
    pub(crate) fn verify(&mut self, name: &str) -> Result<()> {
        self.stream(name, u64::MAX, |_| {})
    }

    /// Checks bytes another reader (libtorch's) read for record `name` against what the
    /// directory gives for it: their count and CRC-32. Reads nothing of the record itself, so
    /// the check is of the very bytes that were used.
    pub(crate) fn check_read(&mut self, name: &str, bytes: u64, crc32: u32) -> Result<()> {
        let path = self.path;
        let full = format!("{}{name}", self.prefix);
        let entry = self
            .zip
            .by_name(&full)
            .map_err(|e| fail(path, format!("cannot read record '{full}': {e}")))?;
        if entry.size() != bytes {
            return Err(fail(
                path,
                format!(
                    "record '{full}' was read as {bytes} bytes where the archive declares {}",
                    entry.size()
                ),
            ));
        }
        if entry.crc32() != crc32 {
            return Err(fail(
                path,
                format!(
                    "record '{full}' is damaged: its bytes do not match the CRC-32 the archive \
                     gives for it"
                ),
            ));
        }
        Ok(())
    }

    /// Checks the format-version record libtorch's reader reads (`.data/version`, or `version`
    /// in older files), where there is one.
    pub(crate) fn verify_version(&mut self) -> Result<()> {
        for name in [".data/version", "version"] {
            let full = format!("{}{name}", self.prefix);
            if self.zip.file_names().any(|n| n == full) {
                return self.verify(name);
            }
        }
        Ok(())
    }

    fn stream(&mut self, name: &str, limit: u64, mut sink: impl FnMut(&[u8])) -> Result<()> {
        let path = self.path;
        let full = format!("{}{name}", self.prefix);
        let mut entry = self
            .zip
            .by_name(&full)
            .map_err(|e| fail(path, format!("cannot read record '{full}': {e}")))?;
        let declared = entry.size();
        if declared > limit {
            return Err(fail(
                path,
                format!(
                    "record '{full}' declares {declared} bytes, over the {limit} a checkpoint's \
                     {name} may hold"
                ),
            ));
        }
        // One byte past the declared size: a stream that inflates to more is caught, not read.
        let mut reader = (&mut entry).take(declared.saturating_add(1));
        let mut buffer = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                // zip 0.6 reports a CRC-32 mismatch at the entry's end as this message (kind
                // Other); any other error of that kind falls through to the disk's below.
                Err(e) if e.to_string().contains("Invalid checksum") => {
                    return Err(fail(
                        path,
                        format!(
                            "record '{full}' is damaged: its bytes do not match the CRC-32 the \
                             archive gives for it"
                        ),
                    ))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // A damaged deflate stream is the file's fault; anything else is the disk's.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidData | ErrorKind::InvalidInput) => {
                    return Err(fail(path, format!("cannot read record '{full}': {e}")))
                }
                Err(e) => return Err(io(path)(e)),
            };
            got += n as u64;
            sink(&buffer[..n]);
        }
        if got != declared {
            return Err(fail(
                path,
                format!("record '{full}' holds {got} bytes where the archive declares {declared}"),
            ));
        }
        Ok(())
    }
}
