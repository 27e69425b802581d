//! Writing files so that a reader never sees half of one: the bytes go to a temporary file
//! beside the target, which is renamed over it once complete (a rename within one
//! directory is atomic), so an interrupted write leaves the previous file intact.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary name [`commit`] renames to `path`.
pub(crate) fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

/// Renames `temporary(path)` over `path` (after flushing it to disk).
pub(crate) fn commit(path: &Path) -> Result<()> {
    let tmp = temporary(path);
    let sync = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    sync.and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    commit(path)
}
