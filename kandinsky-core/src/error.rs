//! Typed errors shared by every kandinsky-rs crate.

use std::path::PathBuf;

/// What went wrong while reading a checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The model asked for a tensor the checkpoint does not have.
    #[error("tensor `{key}` is missing from {}", files_list(files))]
    MissingTensor {
        /// The weight files that were searched.
        files: Vec<PathBuf>,
        /// The state-dict key the model asked for.
        key: String,
    },
    /// The checkpoint has the tensor, with another shape.
    #[error("tensor `{key}` in {} has shape {found:?}, the model expects {expected:?}", file.display())]
    ShapeMismatch {
        /// The file the tensor was found in.
        file: PathBuf,
        /// The state-dict key.
        key: String,
        /// The shape the model asked for.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
}

fn files_list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The error type of every kandinsky-rs library crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (usually a bug or an out-of-memory condition).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A checkpoint tensor is missing or has the wrong shape.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A file could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config, index, manifest) is malformed.
    #[error("malformed JSON in {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: serde_json::Error,
    },
    /// A required file is not there.
    #[error("{} not found: {hint}", path.display())]
    MissingFile {
        /// The path that was expected.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },
    /// A PyTorch pickle weight file that cannot be read. The reader interprets the pickle
    /// data without executing it, so it takes only `torch.save`'s zip format holding tensors.
    #[error("cannot read PyTorch weights {}: {reason}", path.display())]
    Pickle {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value that kandinsky-rs does not implement.
    #[error(
        "unsupported value {value} for `{field}`{}; supported: {supported}",
        in_file(file)
    )]
    UnsupportedConfig {
        /// The config field.
        field: String,
        /// The value found.
        value: String,
        /// The values that are supported.
        supported: String,
        /// The config file, when known.
        file: Option<PathBuf>,
    },
    /// Bad user input (shapes, sizes, ranges): the message says what was expected.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The tokenizer could not be built or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An image could not be decoded or encoded.
    #[error("image: {0}")]
    Image(String),
    /// The run was cancelled by a callback.
    #[error("cancelled by the caller")]
    Cancelled,
}

fn in_file(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!(" in {}", f.display()),
        None => String::new(),
    }
}

impl Error {
    /// Shorthand for [`Error::UnsupportedConfig`] without a file.
    pub fn unsupported(
        field: impl Into<String>,
        value: impl std::fmt::Debug,
        supported: impl Into<String>,
    ) -> Self {
        Error::UnsupportedConfig {
            field: field.into(),
            value: format!("{value:?}"),
            supported: supported.into(),
            file: None,
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// Attach a config file to an [`Error::UnsupportedConfig`].
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            Error::UnsupportedConfig {
                field,
                value,
                supported,
                file: None,
            } => Error::UnsupportedConfig {
                field,
                value,
                supported,
                file: Some(path.to_path_buf()),
            },
            e => e,
        }
    }
}

/// Result alias for [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
