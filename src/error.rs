//! The crate's one error type.
//!
//! Every failure carries a stable [`ErrorKind`] (which the C ABI maps to a status code and the
//! CLI to an exit code), a human message, optionally the file it concerns and the underlying
//! OS error. `Display` prints `file: message: os error`, so callers never need to add context.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, in categories that stay stable across releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused an I/O request.
    Io,
    /// A caller-supplied argument is out of range or malformed.
    InvalidArgument,
    /// The input is in a format this library does not read (or not yet).
    UnsupportedFormat,
    /// The image uses a feature this library does not implement (encryption, ...).
    UnsupportedFeature,
    /// The image's metadata is inconsistent or violates the format's rules.
    Corrupt,
    /// A size or count in the image exceeds a safety limit.
    TooLarge,
    /// The target has not enough space.
    NoSpace,
    /// The trust policy forbids what the image asks for (backing file, data file, ...).
    Denied,
    /// The operation was cancelled by the caller.
    Cancelled,
    /// A named file or snapshot does not exist.
    NotFound,
    /// A network peer could not be reached or broke the protocol.
    Network,
    /// Another process holds the image with locks this use cannot go along with (QEMU's
    /// image locking: a running VM, `qemu-io`, another `qemu-img` or vdisk).
    Locked,
}

impl ErrorKind {
    /// A short lowercase name, stable for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::UnsupportedFormat => "unsupported-format",
            ErrorKind::UnsupportedFeature => "unsupported-feature",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::Denied => "denied",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Network => "network",
            ErrorKind::Locked => "locked",
        }
    }
}

/// The error returned by every fallible function of this crate.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    source: Option<io::Error>,
}

/// Shorthand for `std::result::Result<T, vdisk::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            path: None,
            source: None,
        }
    }

    /// An I/O error with a message saying what was being done.
    pub fn io(message: impl Into<String>, source: io::Error) -> Self {
        // A decoder behind a `Read` reports its verdict (corrupt, over budget, ...) as an
        // io::Error carrying our Error: keep that kind, whoever relays it.
        let inner = source
            .get_ref()
            .and_then(|r| r.downcast_ref::<Error>())
            .map(|e| e.kind);
        let kind = match source.kind() {
            _ if inner.is_some() => inner.unwrap_or(ErrorKind::Io),
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::StorageFull => ErrorKind::NoSpace,
            _ if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                ErrorKind::NoSpace
            }
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            message: message.into(),
            path: None,
            source: Some(source),
        }
    }

    /// Shorthand for a [`ErrorKind::Corrupt`] error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for a [`ErrorKind::InvalidArgument`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Attach the file this error concerns, unless one is already attached.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// The stable category.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without file name or OS error.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The file the error concerns, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Build a [`ErrorKind::Corrupt`] error with `format!` arguments.
macro_rules! corrupt {
    ($($arg:tt)*) => { $crate::error::Error::corrupt(format!($($arg)*)) };
}
pub(crate) use corrupt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_message_and_cause() {
        let e = Error::io("cannot open", io::Error::from_raw_os_error(libc::ENOENT))
            .with_path("/x/y.qcow2");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let s = e.to_string();
        assert!(s.starts_with("/x/y.qcow2: cannot open: "), "{s}");
        let e = Error::io("write", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
    }
}
