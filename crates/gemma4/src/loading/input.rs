//! Reading the bytes of a media file given by path, where `-` means standard input (the
//! CLI's `--image -`, `--audio -`). Errors name the path.

use crate::error::{Error, Result};

/// The bytes of a media file; `-` reads standard input.
pub(crate) fn read_input(path: &std::path::Path) -> Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .map_err(|e| Error::io(path, e))?;
        Ok(b)
    } else {
        std::fs::read(path).map_err(|e| Error::io(path, e))
    }
}
