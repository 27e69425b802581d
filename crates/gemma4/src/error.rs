//! Typed errors of the library. Every variant that concerns user input names the file,
//! tensor or argument at fault, so the CLI can print it on one line.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Every text a variant prints goes through [`escaped`] (paths, names, messages, the
/// underlying errors): much of it comes from files, and a message is one line without
/// raw control characters whatever a file holds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The underlying errors are part of the message, not a `source`: a reporter that
    // prints the chain (anyhow's `{:#}`) would print them twice.
    #[error("{}: {}", path_text(.path), escaped(&.error.to_string()))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{}: invalid JSON: {}", path_text(.path), escaped(&.error.to_string()))]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },

    #[error("{}: invalid config: {}", path_text(.path), escaped(.message))]
    Config { path: PathBuf, message: String },

    #[error("{}: not a valid safetensors file: {}", path_text(.path), escaped(.message))]
    Safetensors { path: PathBuf, message: String },

    #[error("{}: not a valid GGUF file: {}", path_text(.path), escaped(.message))]
    Gguf { path: PathBuf, message: String },

    #[error("tensor `{}` not found in the checkpoint ({})", printable(.name), escaped(.searched))]
    MissingTensor { name: String, searched: String },

    #[error("tensor `{}` in {}: expected shape {expected:?}, found {found:?}", printable(.name), path_text(.path))]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{}` in {}: unsupported dtype {}", printable(.name), path_text(.path), escaped(.dtype))]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },

    #[error("tokenizer {}: {}", path_text(.path), escaped(.message))]
    Tokenizer { path: PathBuf, message: String },

    #[error("chat template: {}", escaped(.0))]
    Template(String),

    #[error("prompt of {prompt} tokens plus {new} new tokens exceeds the model's context of {max} tokens")]
    ContextTooLong {
        prompt: usize,
        new: usize,
        max: usize,
    },

    #[error("image {}: {}", escaped(.name), escaped(.message))]
    Image { name: String, message: String },

    #[error("audio {}: {}", escaped(.name), escaped(.message))]
    Audio { name: String, message: String },

    #[error("invalid argument `{}`: {}", escaped(.arg), escaped(.message))]
    InvalidArgument { arg: String, message: String },

    /// Constrained decoding failed mid-answer (the grammar engine's own error).
    #[error("constrained decoding: {}", escaped(.0))]
    Constraint(String),

    /// From the tensor library: its first line only (with `RUST_BACKTRACE` set, candle
    /// appends a backtrace to its message), escaped.
    #[error("{}", escaped(.0.to_string().lines().next().unwrap_or_default()))]
    Candle(candle_core::Error),
}

fn path_text(p: &std::path::Path) -> String {
    escaped(&p.display().to_string())
}

/// `s` with control characters (and the invisible characters that reorder or hide text)
/// escaped, so a hostile file cannot forge lines or send terminal sequences.
pub(crate) fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        let invisible = matches!(ch, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if ch.is_control() || invisible {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// A name or string from a file for a message: [`escaped`], and cut to 200 characters
/// (a header may hold megabyte-long names).
pub(crate) fn printable(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => escaped(&s[..cut]) + "…",
        None => escaped(s),
    }
}

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Guards running now, on any thread.
static ACTIVE_GUARDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `f`, with a panic inside it turned into `Err(message)`: for libraries that panic on
/// malformed input (`tokenizers` on some hostile files, libjpeg on corrupt data). The
/// panic is not printed: a process-wide hook, installed on first use, stays silent while
/// this thread is inside a guard, and on rayon's workers while any guard runs (`tokenizers`
/// hands work to rayon, which carries a worker's panic back to the thread that waits for
/// it, here into the guard); it hands every other panic to the hook before it.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    use std::sync::atomic::Ordering;
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let silent = GUARDED.with(|g| g.get())
                || (ACTIVE_GUARDS.load(Ordering::SeqCst) > 0
                    && rayon::current_thread_index().is_some());
            if !silent {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    ACTIVE_GUARDS.fetch_add(1, Ordering::SeqCst);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    ACTIVE_GUARDS.fetch_sub(1, Ordering::SeqCst);
    GUARDED.with(|g| g.set(outer));
    result.map_err(|payload| {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        printable(&text)
    })
}

/// Reads and parses a JSON file; errors name the file.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = crate::loading::input::read_text(path)?;
    serde_json::from_str(&text).map_err(|error| Error::Json {
        path: path.into(),
        error,
    })
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn invalid_argument(arg: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg: arg.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic on one of rayon's workers inside a guard comes back as the guard's error and
    /// prints nothing; checked in a child process, whose stderr is all its own.
    #[test]
    fn worker_panics_inside_a_guard_are_caught_and_silent() {
        use rayon::prelude::*;
        const NAME: &str = "error::tests::worker_panics_inside_a_guard_are_caught_and_silent";
        if std::env::var_os("GEMMA4_GUARD_CHILD").is_some() {
            let r = catch_panic(|| {
                (0..64).into_par_iter().for_each(|i| {
                    if i == 63 {
                        panic!("worker {i} failed");
                    }
                })
            });
            assert_eq!(r.unwrap_err(), "worker 63 failed");
            eprintln!("child done");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env("GEMMA4_GUARD_CHILD", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(err.trim(), "child done");
    }
}
