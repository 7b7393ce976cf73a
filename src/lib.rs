//! # vdisk
//!
//! A disk-image engine for virtualisation platforms: it reads QCOW2 (v2 and v3, with every
//! feature qemu-img 10 writes), RAW and ISO images, detects formats from their content, and
//! converts any readable image into a sparse raw disk quickly and with bounded memory.
//!
//! Hostile input is normal input: every size and offset read from an image is checked before
//! use, and images are only allowed to open other files (backing files, external data files)
//! when the caller's [`Policy`] says so.
//!
//! ## Brief overview
//! - [`Image`]: an open image of any format; [`Image::extent`] gives block status and
//!   [`Image::read_at`] reads guest bytes. Open one with [`Image::open`] and [`OpenOptions`].
//! - [`detect::probe`]: format detection from the first bytes.
//! - [`convert::convert_to_raw_path`]: sparse, parallel conversion to a raw file or device.
//! - [`io::BlockIo`]: positional I/O over files, block devices and memory.
//! - [`Error`] with its stable [`ErrorKind`].
//! - `containerdisk::build` (feature `net`): a KubeVirt containerDisk (OCI image) of a disk,
//!   to an OCI archive or layout or pushed to a registry.
//!
//! ```no_run
//! use vdisk::{Image, OpenOptions, convert::{ConvertOptions, convert_to_raw_path}};
//! let img = Image::open("disk.qcow2", &OpenOptions::default())?;
//! convert_to_raw_path(&img, "disk.raw".as_ref(), &mut ConvertOptions::default())?;
//! # Ok::<(), vdisk::Error>(())
//! ```

pub mod archive;
pub mod bench;
pub mod budget;
#[cfg(feature = "net")]
pub mod cdi;
pub mod civil;
pub mod compare;
#[cfg(feature = "net")]
pub mod containerdisk;
pub mod convert;
pub mod create;
pub mod detect;
pub mod edit;
pub mod error;
pub mod ffi;
pub mod forward;
pub mod image;
pub mod info;
pub mod ingest;
pub mod io;
pub mod iso;
pub mod measure;
pub mod net;
pub mod qcow2;
pub mod qjson;
pub mod sizing;
pub mod stream;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use convert::{CancelToken, ConvertOptions, Report};
pub use detect::Format;
pub use error::{Error, ErrorKind, Result};
pub use image::{Extent, Image, OpenOptions, Policy};
