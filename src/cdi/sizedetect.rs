//! CDI's `cdi-image-size-detection` (shipped in the importer image): reads an image's virtual
//! size and writes it, as a decimal string, as the pod's termination message. The binary of
//! the same name only wires this to the process.
//!
//! Command line (Go `flag` syntax, klog flags accepted): `-image-path PATH` (mandatory) and
//! `-scheme file://` (the default; an empty scheme is the same). Exit codes are CDI's
//! (`pkg/controller/common/util.go`): [`ERR_BAD_ARGUMENTS`], [`ERR_INVALID_FILE`],
//! [`ERR_INVALID_PATH`], [`ERR_BAD_TERM_FILE`].
//!
//! The image is untrusted user data: it is opened for metadata only under
//! [`Policy::Untrusted`], so a backing or external data file it names is refused, never
//! opened (an image naming one fails as an invalid file), and the library's metadata limits bound the memory a hostile header can claim.
//!
//! CDI's own tool hands `scheme + path` to `qemu-img info`, so there a missing file is an
//! invalid *file* and only an unparsable URL an invalid *path*. Here a path that does not
//! exist (or names no file: empty, a NUL byte, a missing directory on the way) is
//! [`ERR_INVALID_PATH`], and a path that exists but cannot be opened or read as an image is
//! [`ERR_INVALID_FILE`]: the controller only tells success from failure, and the distinction
//! says which of the two to look at.

use super::Paths;
use super::klog::{GoFlags, Logger};
use crate::error::{Error, ErrorKind};
use crate::image::{Image, OpenOptions, Policy};
use crate::info::ImageInfo;
use std::path::PathBuf;

/// Missing `-image-path`, an unknown flag, or a scheme other than `file://`.
pub const ERR_BAD_ARGUMENTS: i32 = 1;
/// The image cannot be opened or read (not an image, corrupt, hostile).
pub const ERR_INVALID_FILE: i32 = 2;
/// The path names nothing.
pub const ERR_INVALID_PATH: i32 = 3;
/// The termination log cannot be written.
pub const ERR_BAD_TERM_FILE: i32 = 4;

/// The termination log the size goes to.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// The only scheme CDI passes.
pub const FILE_SCHEME: &str = "file://";

/// Why the tool stopped: its exit code and the log line saying so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Process exit code (one of the `ERR_*` constants).
    pub code: i32,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// The parsed command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// `-image-path`, as given.
    pub image_path: String,
    /// `-scheme`.
    pub scheme: String,
    /// A logger at the `-v` verbosity.
    pub logger: Logger,
}

impl Options {
    /// Parse the arguments (the program name excluded).
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Options, Failure> {
        let f = GoFlags::parse(args, &["image-path", "scheme"], &[])
            .map_err(|e| Failure::new(ERR_BAD_ARGUMENTS, e))?;
        let image_path = f.get("image-path").unwrap_or("").to_string();
        if image_path.is_empty() {
            return Err(Failure::new(
                ERR_BAD_ARGUMENTS,
                "One or more mandatory parameters are missing: -image-path",
            ));
        }
        let scheme = f.get("scheme").unwrap_or(FILE_SCHEME).to_string();
        if !scheme.is_empty() && scheme != FILE_SCHEME {
            return Err(Failure::new(
                ERR_BAD_ARGUMENTS,
                format!("unsupported scheme '{scheme}': only {FILE_SCHEME} images can be read"),
            ));
        }
        Ok(Options {
            image_path,
            scheme,
            logger: f.logger(),
        })
    }

    /// The local file named (relocated under `VDISK_ROOT` for tests).
    fn file(&self, paths: &Paths) -> Result<PathBuf, Failure> {
        // With an empty scheme the path may carry it itself.
        let p = self
            .image_path
            .strip_prefix(FILE_SCHEME)
            .unwrap_or(&self.image_path);
        if p.is_empty() || p.contains('\0') {
            return Err(Failure::new(
                ERR_INVALID_PATH,
                format!("invalid image path '{}'", self.image_path.escape_debug()),
            ));
        }
        Ok(paths.relocate(p))
    }
}

/// The virtual size of the image at the path `opts` names, opened as untrusted input.
pub fn virtual_size(opts: &Options, paths: &Paths) -> Result<u64, Failure> {
    let file = opts.file(paths)?;
    if let Err(e) = std::fs::metadata(&file) {
        use std::io::ErrorKind as K;
        let code = match e.kind() {
            K::NotFound | K::NotADirectory | K::InvalidInput => ERR_INVALID_PATH,
            _ => ERR_INVALID_FILE,
        };
        return Err(Failure::new(
            code,
            format!(
                "Unable to extract information from '{}': {e}",
                opts.image_path
            ),
        ));
    }
    let o = OpenOptions {
        policy: Policy::Untrusted,
        metadata_only: true,
        ..OpenOptions::default()
    };
    let invalid = |e: Error| {
        Failure::new(
            ERR_INVALID_FILE,
            format!(
                "Unable to extract information from '{}': {e}",
                opts.image_path
            ),
        )
    };
    let img = Image::open(&file, &o).map_err(invalid)?;
    // Metadata-only opening reports the names of backing and data files without opening
    // them; an uploaded or imported image naming one is refused, as the importer refuses it.
    let info = ImageInfo::new(&img, &opts.image_path).map_err(invalid)?;
    let named = info
        .backing_filename
        .as_deref()
        .map(|b| format!("a backing file ({b})"))
        .or_else(|| {
            info.qcow2
                .as_ref()
                .and_then(|q| q.data_file.as_deref())
                .map(|d| format!("an external data file ({d})"))
        });
    if let Some(what) = named {
        return Err(invalid(Error::new(
            ErrorKind::Denied,
            format!("the image names {what}, which is not allowed"),
        )));
    }
    Ok(info.virtual_size)
}

/// Detect the size and write it to the termination log; the size on success.
pub fn run(opts: &Options, paths: &Paths) -> Result<u64, Failure> {
    let size = virtual_size(opts, paths)?;
    opts.logger
        .v(1, &format!("{}: virtual size {size}", opts.image_path));
    super::write_termination(&paths.get(TERMINATION_LOG), &size.to_string()).map_err(|e| {
        Failure::new(
            ERR_BAD_TERM_FILE,
            format!("Unable to write to termination file: {e}"),
        )
    })?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let o = Options::parse(&["-image-path", "/data/disk.img"]).unwrap();
        assert_eq!(
            (o.image_path.as_str(), o.scheme.as_str()),
            ("/data/disk.img", "file://")
        );
        let o =
            Options::parse(&["--image-path=/d", "-scheme=", "-v=2", "-alsologtostderr"]).unwrap();
        assert_eq!((o.scheme.as_str(), o.logger.verbosity()), ("", 2));
        for bad in [
            &[][..],
            &["-image-path="][..],
            &["-image-path", "/d", "-scheme", "http://"][..],
            &["-image-path", "/d", "-bogus"][..],
            &["-image-path"][..],
        ] {
            assert_eq!(
                Options::parse(bad).unwrap_err().code,
                ERR_BAD_ARGUMENTS,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn paths_that_name_nothing() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(Some(d.path().to_path_buf()));
        for p in ["file://", "/no/such/file", "/etc/x\0y"] {
            let o = Options {
                image_path: p.into(),
                scheme: String::new(),
                logger: Logger::new(0),
            };
            assert_eq!(
                virtual_size(&o, &paths).unwrap_err().code,
                ERR_INVALID_PATH,
                "{p:?}"
            );
        }
        let o = Options {
            image_path: "/".into(),
            scheme: FILE_SCHEME.into(),
            logger: Logger::new(0),
        };
        assert_eq!(virtual_size(&o, &paths).unwrap_err().code, ERR_INVALID_FILE);
    }
}
