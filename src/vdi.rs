//! VDI images: not read yet (the reader lands in this module behind [`crate::image::Driver`]).

use crate::error::{Error, ErrorKind, Result};
use crate::image::{Driver, DriverContext};
use crate::io::BlockIo;
use std::sync::Arc;

/// Open a VDI image held by `io`.
pub fn open(_io: Arc<dyn BlockIo>, _ctx: &DriverContext<'_>) -> Result<Box<dyn Driver>> {
    Err(Error::new(
        ErrorKind::UnsupportedFormat,
        "recognised as vdi image; this format is not supported yet",
    ))
}
