//! Typed errors of the library. Every variant that concerns user input names the file,
//! tensor or argument at fault, so the CLI can print it on one line.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: not a valid GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },

    #[error("tensor `{name}` not found in the checkpoint ({searched})")]
    MissingTensor { name: String, searched: String },

    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{name}` in {path}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("prompt of {prompt} tokens plus {new} new tokens exceeds the model's context of {max} tokens")]
    ContextTooLong {
        prompt: usize,
        new: usize,
        max: usize,
    },

    #[error("image {name}: {message}")]
    Image { name: String, message: String },

    #[error("audio {name}: {message}")]
    Audio { name: String, message: String },

    #[error("invalid argument `{arg}`: {message}")]
    InvalidArgument { arg: String, message: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Reads and parses a JSON file; errors name the file.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
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
