//! Opening the files a user names: checkpoints, configs, tokenizers, templates and media.
//! Only regular files are read (a FIFO, a device or a directory in place of
//! `model.safetensors` or `config.json` would block forever or never end), and the open
//! itself does not block. `-` as a media path means standard input (the CLI's `--image -`,
//! `--audio -`). Errors name the path.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// `path` opened for reading, if it is a regular file.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading blocks until a writer appears; with O_NONBLOCK it returns
    // at once, and the check below refuses it. Regular files ignore the flag.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what}, where a file was expected"),
            ),
        ));
    }
    Ok(file)
}

/// The bytes of the regular file `path`.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_regular(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The UTF-8 text of the regular file `path`.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?).map_err(|_| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        )
    })
}

/// The bytes of a media file; `-` reads standard input.
pub(crate) fn read_input(path: &Path) -> Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::stdin()
            .read_to_end(&mut b)
            .map_err(|e| Error::io(path, e))?;
        Ok(b)
    } else {
        read_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("gemma4-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.json");
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(read_text(&file).unwrap(), "{}");
        let err = read_file(&dir).unwrap_err().to_string();
        assert!(
            err.contains("directory") && err.contains("gemma4-input"),
            "{err}"
        );
        #[cfg(unix)]
        {
            // A FIFO with no writer: opening it would block forever without O_NONBLOCK.
            let fifo = dir.join("config.json");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let err = read_text(&fifo).unwrap_err().to_string();
            assert!(
                err.contains("not a regular file") && err.contains("config.json"),
                "{err}"
            );
            let err = open_regular(Path::new("/dev/zero"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
