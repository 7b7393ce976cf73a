//! C ABI for the streaming import (`vdisk::ingest::import`): an options builder, a report
//! struct, and the call that reads a file descriptor (a pipe, socket or file) to its end.

use super::{
    CEnum, Fail, boundary, c_enum, path_arg, vdisk_cancel, vdisk_error, vdisk_progress_fn,
    vdisk_status, with_builder, with_builder_enum,
};
use crate::ingest::{ContentType, ImportOptions, ImportTarget};
use std::ffi::{c_char, c_void};
use std::os::fd::{FromRawFd, RawFd};

/// What the input of `vdisk_import_fd` holds.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_content {
    /// A disk image (raw, qcow2, ISO; possibly gz/xz/zstd-compressed or inside a tar).
    Kubevirt = 0,
    /// A tar archive unpacked into a directory.
    Archive = 1,
    /// Bytes written as they come (no decompression, detection or sizing): a clone stream.
    Raw = 2,
}

c_enum!(vdisk_content: Kubevirt, Archive, Raw);

/// Where `vdisk_import_fd` writes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_target {
    /// A raw disk file (created mode 0660, renamed into place only when complete).
    File = 0,
    /// An existing block device, written in place.
    Device = 1,
    /// A directory an archive is unpacked into.
    Directory = 2,
}

c_enum!(vdisk_target: File, Device, Directory);

/// How `vdisk_import_fd` works. Made by `vdisk_import_options_new` with the defaults of
/// CDI's importer: content `KUBEVIRT`, filesystem overhead 0.06, no requested size (the disk
/// keeps its virtual size), no preallocation, 32 MiB for out-of-order qcow2 data with
/// spilling to the target volume beyond it, one decoder thread per core, buffered I/O.
/// Not safe to change from several threads at once.
pub struct vdisk_import_options {
    content: ContentType,
    overhead: f64,
    requested_size: Option<u64>,
    preallocate: bool,
    memory_budget: u64,
    allow_spill: bool,
    threads: u32,
    input_size: Option<u64>,
    direct_io: bool,
    progress: vdisk_progress_fn,
    user_data: *mut c_void,
    cancel: Option<crate::CancelToken>,
}

impl Default for vdisk_import_options {
    fn default() -> Self {
        let d = ImportOptions::default();
        vdisk_import_options {
            content: d.content,
            overhead: d.overhead,
            requested_size: d.requested_size,
            preallocate: d.preallocate,
            memory_budget: d.memory_budget,
            allow_spill: d.allow_spill,
            threads: d.threads,
            input_size: d.input_size,
            direct_io: d.direct_io,
            progress: None,
            user_data: std::ptr::null_mut(),
            cancel: None,
        }
    }
}

/// New import options with the defaults; free with `vdisk_import_options_free`.
#[unsafe(no_mangle)]
pub extern "C" fn vdisk_import_options_new() -> *mut vdisk_import_options {
    Box::into_raw(Box::default())
}

/// Free import options. NULL is a no-op.
///
/// # Safety
/// `o` is NULL or options from `vdisk_import_options_new` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_free(o: *mut vdisk_import_options) {
    if !o.is_null() {
        // SAFETY: `o` came from `Box::into_raw` here and is freed only once.
        drop(unsafe { Box::from_raw(o) });
    }
}

/// Set what the input holds (default `VDISK_CONTENT_KUBEVIRT`).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_content(
    o: *mut vdisk_import_options,
    content: u32,
) -> vdisk_status {
    with_builder_enum(o, content, |o, content| {
        o.content = match content {
            vdisk_content::Kubevirt => ContentType::Kubevirt,
            vdisk_content::Archive => ContentType::Archive,
            vdisk_content::Raw => ContentType::Raw,
        };
    })
}

/// Set the filesystem overhead fraction, 0.0 to 1.0 (CDI's `FILESYSTEM_OVERHEAD`); other
/// values give `VDISK_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_overhead(
    o: *mut vdisk_import_options,
    overhead: f64,
) -> vdisk_status {
    if !o.is_null() && !(0.0..=1.0).contains(&overhead) {
        return vdisk_status::InvalidArgument;
    }
    with_builder(o, |o| o.overhead = overhead)
}

/// Set the requested volume size in bytes (CDI's `IMPORTER_IMAGE_SIZE`): the image must fit
/// its usable space, and a disk file is expanded to it. 0 means none (the default).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_requested_size(
    o: *mut vdisk_import_options,
    bytes: u64,
) -> vdisk_status {
    with_builder(o, |o| {
        o.requested_size = (bytes > 0).then_some(bytes);
    })
}

/// Non-zero: preallocate the whole disk (fallocate, falling back to writing zeros).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_preallocate(
    o: *mut vdisk_import_options,
    preallocate: i32,
) -> vdisk_status {
    with_builder(o, |o| {
        o.preallocate = preallocate != 0;
    })
}

/// Memory for qcow2 data that arrives before its mapping (default 32 MiB), and whether data
/// beyond it may spill to an unlinked file on the target's volume (`allow_spill` non-zero,
/// the default). With neither, such an image is refused.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_memory(
    o: *mut vdisk_import_options,
    budget: u64,
    allow_spill: i32,
) -> vdisk_status {
    with_builder(o, |o| {
        o.memory_budget = budget;
        o.allow_spill = allow_spill != 0;
    })
}

/// Decoder threads (xz); 0 means one per core.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_threads(
    o: *mut vdisk_import_options,
    threads: u32,
) -> vdisk_status {
    with_builder(o, |o| {
        o.threads = if threads == 0 {
            ImportOptions::default().threads
        } else {
            threads
        };
    })
}

/// The input's size when known (a Content-Length), used as the progress total; 0 for unknown.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_input_size(
    o: *mut vdisk_import_options,
    bytes: u64,
) -> vdisk_status {
    with_builder(o, |o| {
        o.input_size = (bytes > 0).then_some(bytes);
    })
}

/// Non-zero: write the target with `O_DIRECT` where it supports it, keeping the page cache
/// small.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_direct_io(
    o: *mut vdisk_import_options,
    direct: i32,
) -> vdisk_status {
    with_builder(o, |o| {
        o.direct_io = direct != 0;
    })
}

/// Set the progress callback (NULL for none) and its `user_data`. It receives input bytes
/// read and the input size (0 when unknown), runs on the thread that called
/// `vdisk_import_fd`, and cancels the import by returning non-zero.
///
/// # Safety
/// `o` is NULL or live options; `user_data` stays valid while imports use it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_progress(
    o: *mut vdisk_import_options,
    progress: vdisk_progress_fn,
    user_data: *mut c_void,
) -> vdisk_status {
    with_builder(o, |o| {
        o.progress = progress;
        o.user_data = user_data;
    })
}

/// Watch `cancel` (NULL for none); the options keep their own reference.
///
/// # Safety
/// `o` is NULL or live options; `cancel` is NULL or a live token.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_options_set_cancel(
    o: *mut vdisk_import_options,
    cancel: *const vdisk_cancel,
) -> vdisk_status {
    // SAFETY: per the contract, a non-NULL `cancel` is a live token.
    let token = unsafe { cancel.as_ref() }.map(|c| c.inner.clone());
    with_builder(o, |o| {
        o.cancel = token;
    })
}

/// What `vdisk_import_fd` did.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct vdisk_import_report {
    /// Format of the image inside the compression layers ("raw", "qcow2", "tar", ...).
    /// Static storage; never free it.
    pub format: *const c_char,
    /// Input bytes read.
    pub bytes_read: u64,
    /// Data bytes written to the target.
    pub bytes_written: u64,
    /// Virtual size of the imported disk, before expansion.
    pub virtual_size: u64,
    /// Final size of the disk file or device.
    pub disk_size: u64,
    /// Bytes of qcow2 data spilled to a temporary file.
    pub spilled_bytes: u64,
    /// Non-zero when the disk was preallocated.
    pub preallocated: i32,
}

/// Read an image (or archive) from the file descriptor `fd` to its end and write it to
/// `target` of kind `kind`, streaming with bounded memory: gz, xz and zstd are unwrapped,
/// qcow2 is converted on the fly, sizes are validated against the target before writing.
/// `fd` may be a pipe or socket; it is read, never seeked or closed. `opts` NULL uses the
/// defaults; `report` may be NULL. On failure no file is left at a `FILE` target.
///
/// # Safety
/// `fd` is an open, readable descriptor owned by the caller for the duration of the call;
/// `target` is NUL-terminated; `opts` is NULL or live options; `report` is NULL or
/// writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_import_fd(
    fd: i32,
    kind: u32,
    target: *const c_char,
    opts: *const vdisk_import_options,
    report: *mut vdisk_import_report,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let kind = vdisk_target::from_c(kind)?;
        let path = path_arg(target, "target")?;
        if fd < 0 {
            return Err(Fail(
                vdisk_status::InvalidArgument,
                format!("invalid file descriptor {fd}"),
            ));
        }
        let defaults = vdisk_import_options::default();
        // SAFETY: per the contract, a non-NULL `opts` is live options.
        let o = unsafe { opts.as_ref() }.unwrap_or(&defaults);
        // SAFETY: `fd` is open and owned by the caller during the call; ManuallyDrop keeps the
        // File from closing it.
        let file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd as RawFd) });
        let reader: &std::fs::File = &file;
        let target = match kind {
            vdisk_target::File => ImportTarget::File(path),
            vdisk_target::Device => ImportTarget::Device(path),
            vdisk_target::Directory => ImportTarget::Directory(path),
        };
        let (progress, user_data) = (o.progress, o.user_data);
        let mut cb = |done: u64, total: Option<u64>| match progress {
            // SAFETY: the caller's callback, called on this thread with its own user data.
            Some(f) => (unsafe { f(user_data, done, total.unwrap_or(0)) }) == 0,
            None => true,
        };
        let mut io = ImportOptions {
            content: o.content,
            overhead: o.overhead,
            requested_size: o.requested_size,
            preallocate: o.preallocate,
            memory_budget: o.memory_budget,
            allow_spill: o.allow_spill,
            threads: o.threads,
            input_size: o.input_size,
            cancel: o.cancel.clone(),
            direct_io: o.direct_io,
            ..ImportOptions::default()
        };
        if progress.is_some() {
            io.progress = Some(&mut cb);
        }
        let r = crate::ingest::import(Box::new(reader), &target, &mut io)?;
        // SAFETY: per the contract, a non-NULL `report` is writable.
        if let Some(out) = unsafe { report.as_mut() } {
            *out = vdisk_import_report {
                format: r.format.map_or(c"unknown".as_ptr(), format_name),
                bytes_read: r.bytes_read,
                bytes_written: r.bytes_written,
                virtual_size: r.virtual_size,
                disk_size: r.disk_size,
                spilled_bytes: r.spilled_bytes,
                preallocated: r.preallocation_applied.into(),
            };
        }
        Ok(())
    })
}

/// A static C string naming `f`.
fn format_name(f: crate::Format) -> *const c_char {
    use crate::Format as F;
    let s: &'static std::ffi::CStr = match f {
        F::Raw => c"raw",
        F::Qcow2 => c"qcow2",
        F::Iso => c"iso",
        F::Tar => c"tar",
        F::Gzip => c"gzip",
        F::Xz => c"xz",
        F::Zstd => c"zstd",
        _ => c"other",
    };
    s.as_ptr()
}
