//! C ABI for whole-image operations: convert (with its options builder), create, resize,
//! check (and repair), compare and internal snapshots.

use super::{
    CEnum, Fail, boundary, c_enum, image_ref, null, path_arg, policy, vdisk_cancel, vdisk_error,
    vdisk_image, vdisk_progress_fn, vdisk_status, with_builder, with_builder_enum,
};
use crate::image::{Image, OpenOptions};
use crate::qcow2::writer::{CreateOptions, Prealloc};
use std::ffi::{CStr, c_char, c_void};

/// Output format of `vdisk_convert` and `vdisk_create`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_format {
    /// Raw bytes (sparse).
    Raw = 0,
    /// qcow2.
    Qcow2 = 1,
}

c_enum!(vdisk_format: Raw, Qcow2);

/// Preallocation mode, as qemu-img's `preallocation=` option.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_preallocation {
    /// Nothing preallocated (sparse).
    Off = 0,
    /// qcow2 metadata only.
    Metadata = 1,
    /// Space reserved with fallocate (full where the filesystem cannot).
    Falloc = 2,
    /// Every byte written.
    Full = 3,
}

c_enum!(vdisk_preallocation: Off, Metadata, Falloc, Full);

impl From<vdisk_preallocation> for Prealloc {
    fn from(p: vdisk_preallocation) -> Self {
        match p {
            vdisk_preallocation::Off => Prealloc::Off,
            vdisk_preallocation::Metadata => Prealloc::Metadata,
            vdisk_preallocation::Falloc => Prealloc::Falloc,
            vdisk_preallocation::Full => Prealloc::Full,
        }
    }
}

impl From<Prealloc> for vdisk_preallocation {
    fn from(p: Prealloc) -> Self {
        match p {
            Prealloc::Off => vdisk_preallocation::Off,
            Prealloc::Metadata => vdisk_preallocation::Metadata,
            Prealloc::Falloc => vdisk_preallocation::Falloc,
            Prealloc::Full => vdisk_preallocation::Full,
        }
    }
}

fn text_options(options: *const c_char) -> Result<CreateOptions, Fail> {
    let mut co = CreateOptions::default();
    if !options.is_null() {
        // SAFETY: every caller documents `options` as NULL or NUL-terminated.
        co.apply(&unsafe { CStr::from_ptr(options) }.to_string_lossy())?;
    }
    Ok(co)
}

/// How `vdisk_convert` works. Made by `vdisk_convert_options_new` with qemu-img's
/// defaults (raw output, 4 KiB sparse runs, trusted input, no progress, no cancel token).
/// Not safe to change from several threads at once; one object may serve many conversions.
pub struct vdisk_convert_options {
    format: vdisk_format,
    create: CreateOptions,
    compress: bool,
    min_sparse: u64,
    untrusted: bool,
    progress: vdisk_progress_fn,
    user_data: *mut c_void,
    cancel: Option<crate::CancelToken>,
}

impl Default for vdisk_convert_options {
    fn default() -> Self {
        vdisk_convert_options {
            format: vdisk_format::Raw,
            create: CreateOptions::default(),
            compress: false,
            min_sparse: 4096,
            untrusted: false,
            progress: None,
            user_data: std::ptr::null_mut(),
            cancel: None,
        }
    }
}

/// New convert options with the defaults; free with `vdisk_convert_options_free`.
#[unsafe(no_mangle)]
pub extern "C" fn vdisk_convert_options_new() -> *mut vdisk_convert_options {
    Box::into_raw(Box::default())
}

/// Free convert options. NULL is a no-op.
///
/// # Safety
/// `o` is NULL or options from `vdisk_convert_options_new` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_free(o: *mut vdisk_convert_options) {
    if !o.is_null() {
        // SAFETY: `o` came from `Box::into_raw` here and is freed only once.
        drop(unsafe { Box::from_raw(o) });
    }
}

/// Set the output format (default raw).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_format(
    o: *mut vdisk_convert_options,
    format: u32,
) -> vdisk_status {
    with_builder_enum(o, format, |o, format| o.format = format)
}

/// Parse qemu-img `-o` text for the output (`cluster_size=64k,compat=1.1,compression_type=zstd,
/// preallocation=falloc,...`). It replaces earlier text and resets the preallocation to what
/// the text says; a bad option fails here with `VDISK_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `o` is NULL or live options; `text` is NUL-terminated; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_create_options(
    o: *mut vdisk_convert_options,
    text: *const c_char,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        // SAFETY: per the contract, a non-NULL `o` is live options used by this thread only.
        let o = unsafe { o.as_mut() }.ok_or_else(|| null("o"))?;
        if text.is_null() {
            return Err(null("text"));
        }
        o.create = text_options(text)?;
        Ok(())
    })
}

/// Set the preallocation of the output (default off).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_preallocation(
    o: *mut vdisk_convert_options,
    mode: u32,
) -> vdisk_status {
    with_builder_enum(o, mode, |o, mode: vdisk_preallocation| {
        o.create.prealloc = mode.into()
    })
}

/// Non-zero: write compressed qcow2 clusters (qemu-img `-c`); ignored for raw output.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_compress(
    o: *mut vdisk_convert_options,
    compress: i32,
) -> vdisk_status {
    with_builder(o, |o| o.compress = compress != 0)
}

/// Zero runs of at least `bytes` become holes (qemu-img `-S`, default 4096; 0 writes every
/// byte).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_min_sparse(
    o: *mut vdisk_convert_options,
    bytes: u64,
) -> vdisk_status {
    with_builder(o, |o| o.min_sparse = bytes)
}

/// Non-zero: the source is untrusted, so a backing or external data file it names is refused
/// (`VDISK_STATUS_DENIED`) instead of opened.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_untrusted(
    o: *mut vdisk_convert_options,
    untrusted: i32,
) -> vdisk_status {
    with_builder(o, |o| o.untrusted = untrusted != 0)
}

/// Set the progress callback (NULL for none) and the `user_data` passed to it. The callback
/// runs on the thread that called `vdisk_convert`; its non-zero return cancels.
///
/// # Safety
/// `o` is NULL or live options; `user_data` stays valid while conversions use it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_progress(
    o: *mut vdisk_convert_options,
    progress: vdisk_progress_fn,
    user_data: *mut c_void,
) -> vdisk_status {
    with_builder(o, |o| {
        o.progress = progress;
        o.user_data = user_data;
    })
}

/// Watch `cancel` (NULL for none). The options hold their own reference: the token may be
/// freed independently.
///
/// # Safety
/// `o` is NULL or live options; `cancel` is NULL or a live token.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert_options_set_cancel(
    o: *mut vdisk_convert_options,
    cancel: *const vdisk_cancel,
) -> vdisk_status {
    // SAFETY: per the contract, a non-NULL `cancel` is a live token.
    let token = unsafe { cancel.as_ref() }.map(|c| c.inner.clone());
    with_builder(o, |o| o.cancel = token)
}

/// Convert the image at `src` into a new image at `dst` as `opts` says (NULL: the defaults,
/// a sparse raw copy). The target is complete only when this returns `VDISK_STATUS_OK`;
/// otherwise nothing is left at `dst`. `opts` is only read, so one set of options may serve
/// conversions on several threads when it has no progress callback.
///
/// # Safety
/// `src`, `dst` are NUL-terminated; `opts` is NULL or live options; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_convert(
    src: *const c_char,
    dst: *const c_char,
    opts: *const vdisk_convert_options,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let src = path_arg(src, "src")?;
        let dst = path_arg(dst, "dst")?;
        let defaults = vdisk_convert_options::default();
        // SAFETY: per the contract, a non-NULL `opts` is live options.
        let o = unsafe { opts.as_ref() }.unwrap_or(&defaults);
        let target = match o.format {
            vdisk_format::Raw => crate::convert::Target::Raw,
            vdisk_format::Qcow2 => crate::convert::Target::Qcow2 {
                options: o.create.clone(),
                compress: o.compress,
            },
        };
        let img = Image::open(
            &src,
            &OpenOptions {
                policy: policy(o.untrusted),
                ..OpenOptions::default()
            },
        )?;
        let (progress, user_data) = (o.progress, o.user_data);
        let mut cb = |done: u64, total: u64| match progress {
            // SAFETY: the caller's callback, called on this thread with its own user data.
            Some(f) => (unsafe { f(user_data, done, total) }) == 0,
            None => true,
        };
        let mut co = crate::ConvertOptions {
            min_sparse: o.min_sparse,
            cancel: o.cancel.clone(),
            ..Default::default()
        };
        if progress.is_some() {
            co.progress = Some(&mut cb);
        }
        crate::convert::convert_path(&img, &dst, &target, &mut co)?;
        if o.format == vdisk_format::Raw {
            crate::create::preallocate_file(&dst, o.create.prealloc)?;
        }
        Ok(())
    })
}

/// Create an empty image of `size` bytes at `path`. `options` is qemu-img `-o` text
/// (`cluster_size`, `compat`, `preallocation`, `backing_file`, ...) or NULL. When `applied`
/// is not NULL it receives the preallocation actually applied (falloc becomes full where the
/// filesystem cannot reserve space).
///
/// # Safety
/// `path` is NUL-terminated; `options` is NULL or NUL-terminated; `applied` is NULL or
/// writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_create(
    path: *const c_char,
    format: u32,
    size: u64,
    options: *const c_char,
    applied: *mut vdisk_preallocation,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let format = vdisk_format::from_c(format)?;
        let p = path_arg(path, "path")?;
        let co = text_options(options)?;
        let f = match format {
            vdisk_format::Raw => crate::Format::Raw,
            vdisk_format::Qcow2 => crate::Format::Qcow2,
        };
        let done = crate::create::create(&p, f, size, &co)?;
        // SAFETY: per the contract, a non-NULL `applied` is writable.
        if let Some(a) = unsafe { applied.as_mut() } {
            *a = done.into();
        }
        Ok(())
    })
}

/// Set the virtual size of the image at `path` (raw or qcow2) to `new_size` bytes, as
/// `qemu-img resize`. Shrinking needs `allow_shrink` non-zero; `prealloc` applies to the
/// grown area.
///
/// # Safety
/// `path` is NUL-terminated; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_resize(
    path: *const c_char,
    new_size: u64,
    allow_shrink: i32,
    prealloc: u32,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let prealloc = vdisk_preallocation::from_c(prealloc)?;
        let p = path_arg(path, "path")?;
        crate::edit::resize(
            &p,
            None,
            crate::edit::SizeChange::To(new_size),
            allow_shrink != 0,
            prealloc.into(),
        )?;
        Ok(())
    })
}

/// What `vdisk_check` may repair.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_repair {
    /// Check only.
    None = 0,
    /// Repair leaks when there are no corruptions (`qemu-img check -r leaks`).
    Leaks = 1,
    /// Repair leaks and refcount corruptions (`qemu-img check -r all`).
    All = 2,
}

c_enum!(vdisk_repair: None, Leaks, All);

/// The counters of `qemu-img check`, after any repair.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct vdisk_check_report {
    /// Corruptions left.
    pub corruptions: u64,
    /// Leaked clusters left.
    pub leaks: u64,
    /// Parts of the check that could not run.
    pub check_errors: u64,
    /// Leaked clusters repaired.
    pub leaks_fixed: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Virtual size in clusters.
    pub total_clusters: u64,
    /// Guest clusters with host space.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the highest used host cluster.
    pub image_end_offset: u64,
    /// `qemu-img check`'s exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub exit_code: i32,
}

/// Check the qcow2 image at `path`, repairing as `repair` says, and fill `*report`. A raw
/// or ISO image gives `VDISK_STATUS_UNSUPPORTED_FEATURE` (qemu-img's exit 63).
///
/// # Safety
/// `path` is NUL-terminated; `report` is writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_check(
    path: *const c_char,
    repair: u32,
    report: *mut vdisk_check_report,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let repair = vdisk_repair::from_c(repair)?;
        let p = path_arg(path, "path")?;
        if report.is_null() {
            return Err(null("report"));
        }
        let mode = match repair {
            vdisk_repair::None => crate::edit::Repair::None,
            vdisk_repair::Leaks => crate::edit::Repair::Leaks,
            vdisk_repair::All => crate::edit::Repair::All,
        };
        let out = crate::edit::check_and_repair(&p, None, mode, &mut |_| {})?;
        let r = match out.checked {
            crate::qcow2::check::Checked::Qcow2(r) | crate::qcow2::check::Checked::Other(_, r) => r,
            crate::qcow2::check::Checked::NoCheck(_) => {
                return Err(Fail(
                    vdisk_status::UnsupportedFeature,
                    format!("{}: this image format does not support checks", p.display()),
                ));
            }
        };
        let (leaks_fixed, corruptions_fixed) = out.repaired.unwrap_or((0, 0));
        let x = vdisk_check_report {
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            leaks_fixed,
            corruptions_fixed,
            total_clusters: r.total_clusters,
            allocated_clusters: r.allocated_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            image_end_offset: r.image_end_offset,
            exit_code: r.exit_code().into(),
        };
        // SAFETY: `report` is non-NULL and writable per the contract.
        unsafe { *report = x };
        Ok(())
    })
}

/// Compare the content of two open images as `qemu-img compare`: `*identical` receives 1 when
/// they read the same (a shorter image reads as zeros past its end) and 0 otherwise, with
/// `*first_difference` the guest offset of the first differing sector. With `strict` non-zero
/// (`qemu-img compare -s`) different sizes differ (at the smaller size), and so does a
/// different allocation status (allocated, zero, data, compressed), at the first offset
/// where it differs. `first_difference` may be NULL.
///
/// # Safety
/// `a`, `b` are live images; `identical` is writable; `first_difference` is NULL or
/// writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_compare(
    a: *const vdisk_image,
    b: *const vdisk_image,
    strict: i32,
    identical: *mut i32,
    first_difference: *mut u64,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let (a, b) = (image_ref(a)?, image_ref(b)?);
        if identical.is_null() {
            return Err(null("identical"));
        }
        use crate::compare::Comparison;
        let (same, at) = match crate::compare::compare(a, b, strict != 0)? {
            Comparison::Identical => (1, 0),
            Comparison::Differ(off) | Comparison::StatusMismatch(off) => (0, off),
            Comparison::SizeMismatch => (0, a.virtual_size().min(b.virtual_size())),
        };
        // SAFETY: `identical` is non-NULL and writable; `first_difference` is NULL or
        // writable, per the contract.
        unsafe {
            *identical = same;
            if let Some(d) = first_difference.as_mut() {
                *d = at;
            }
        }
        Ok(())
    })
}

/// An internal-snapshot operation of `vdisk_snapshot`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_snapshot_op {
    /// Create a snapshot of the current state named `name` (`qemu-img snapshot -c`).
    Create = 0,
    /// Revert the disk to the snapshot with this id or name (`-a`).
    Apply = 1,
    /// Delete the snapshot with this id or name (`-d`).
    Delete = 2,
}

c_enum!(vdisk_snapshot_op: Create, Apply, Delete);

/// Create, apply or delete an internal snapshot of the qcow2 image at `path`. The edit is
/// crash-safe: an interruption leaves the old state or the new one. List snapshots with
/// `vdisk_image_info_json` (`"snapshots"`) or `vdisk_image_snapshot_count`.
///
/// # Safety
/// `path`, `name` are NUL-terminated; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_snapshot(
    path: *const c_char,
    op: u32,
    name: *const c_char,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let op = vdisk_snapshot_op::from_c(op)?;
        let p = path_arg(path, "path")?;
        if name.is_null() {
            return Err(null("name"));
        }
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let n = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        use crate::edit::SnapshotOp;
        let op = match op {
            vdisk_snapshot_op::Create => SnapshotOp::Create(n),
            vdisk_snapshot_op::Apply => SnapshotOp::Apply(n),
            vdisk_snapshot_op::Delete => SnapshotOp::Delete(n),
        };
        crate::edit::snapshot(&p, &op)?;
        Ok(())
    })
}

/// A NUL-terminated string argument that may be NULL.
fn opt_text(p: *const c_char) -> Option<String> {
    // SAFETY: every caller documents `p` as NULL or NUL-terminated for the call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn format_name(name: Option<String>) -> Result<Option<crate::Format>, Fail> {
    name.map(|n| {
        crate::Format::from_name(&n).ok_or_else(|| {
            Fail(
                vdisk_status::InvalidArgument,
                format!("unknown file format '{n}'"),
            )
        })
    })
    .transpose()
}

/// Make the qcow2 image at `path` use `backing` (format `backing_format`; both NULL: no
/// backing file), as `qemu-img rebase`. Unless `unsafe_names_only` is non-zero, whatever the
/// change would alter in the guest's disk is first copied into the image, so it reads the same.
/// The edit is crash-safe.
///
/// # Safety
/// `path` is NUL-terminated; `backing` and `backing_format` are NULL or NUL-terminated; `err`
/// is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_rebase(
    path: *const c_char,
    backing: *const c_char,
    backing_format: *const c_char,
    unsafe_names_only: i32,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let p = path_arg(path, "path")?;
        let name = opt_text(backing).filter(|b| !b.is_empty());
        let fmt = format_name(opt_text(backing_format))?;
        let b = name.as_deref().map(|n| (n, fmt));
        crate::edit::rebase(&p, None, b, unsafe_names_only != 0, &mut |_, _| {})?;
        Ok(())
    })
}

/// Write what the image at `path` holds into its backing file (or into `base`, an image
/// further down its chain), then empty the image unless `keep` is non-zero (or `base` is not
/// the backing file itself), as `qemu-img commit`.
///
/// # Safety
/// `path` is NUL-terminated; `base` is NULL or NUL-terminated; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_commit(
    path: *const c_char,
    base: *const c_char,
    keep: i32,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let p = path_arg(path, "path")?;
        let b = if base.is_null() {
            None
        } else {
            Some(path_arg(base, "base")?)
        };
        crate::edit::commit(&p, None, b.as_deref(), keep != 0, &mut |_, _| {})?;
        Ok(())
    })
}

/// Change options of the qcow2 image at `path` as `qemu-img amend -o OPTIONS`
/// (`compat=0.10|1.1`, `refcount_bits=N`, `lazy_refcounts=on|off`), crash-safely.
///
/// # Safety
/// `path` and `options` are NUL-terminated; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_amend(
    path: *const c_char,
    options: *const c_char,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let p = path_arg(path, "path")?;
        let o = opt_text(options).ok_or_else(|| null("options"))?;
        let mut a = crate::edit::Amend::default();
        a.apply(&o)?;
        crate::edit::amend(&p, None, &a)?;
        Ok(())
    })
}

/// What `vdisk_measure` reports, in bytes (`qemu-img measure`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct vdisk_measure_report {
    /// File size the converted image needs.
    pub required: u64,
    /// File size with every cluster allocated.
    pub fully_allocated: u64,
    /// Space for persistent bitmaps (when `has_bitmaps`).
    pub bitmaps: u64,
    /// Non-zero when `bitmaps` applies (qcow2 v3 output from a qcow2 v3 image).
    pub has_bitmaps: i32,
}

/// Measure the image at `path` (or, when `path` is NULL, an empty disk of `size` bytes)
/// converted to `format` (a `vdisk_format`) with qemu-img `-o` text `options` (NULL: none).
///
/// # Safety
/// `path` and `options` are NULL or NUL-terminated; `report` is writable; `err` is NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_measure(
    path: *const c_char,
    size: u64,
    format: u32,
    options: *const c_char,
    report: *mut vdisk_measure_report,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let f = match vdisk_format::from_c(format)? {
            vdisk_format::Raw => crate::Format::Raw,
            vdisk_format::Qcow2 => crate::Format::Qcow2,
        };
        if report.is_null() {
            return Err(null("report"));
        }
        let co = text_options(options)?;
        let img;
        let src = if path.is_null() {
            crate::measure::Source::Size(size)
        } else {
            img = Image::open(path_arg(path, "path")?, &OpenOptions::default())?;
            crate::measure::Source::Image(&img)
        };
        let m = crate::measure::measure(&src, f, &co)?;
        let r = vdisk_measure_report {
            required: m.required,
            fully_allocated: m.fully_allocated,
            bitmaps: m.bitmaps.unwrap_or(0),
            has_bitmaps: i32::from(m.bitmaps.is_some()),
        };
        // SAFETY: `report` is non-NULL and writable per the contract.
        unsafe { *report = r };
        Ok(())
    })
}

/// Write an ISO 9660 image (Joliet and Rock Ridge) at `dst` from `n_sources` sources, as
/// `vdisk create -f iso`: each source is a host directory (its contents go to the root), a
/// host file (at the root under its name) or `ISO/PATH=HOST`. `options` is NULL or a `-o`
/// string (`volid=NAME,joliet=off,rockridge=off,iso_level=N,rational=on,appid=TEXT`).
/// `SOURCE_DATE_EPOCH`, when set, fixes every date (reproducible output). The image is
/// written under a temporary name and renamed into place only when complete.
///
/// # Safety
/// `sources` points at `n_sources` NUL-terminated strings; `dst` is NUL-terminated; `options`
/// is NULL or NUL-terminated; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_iso_create(
    sources: *const *const c_char,
    n_sources: usize,
    dst: *const c_char,
    options: *const c_char,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let dst = path_arg(dst, "dst")?;
        if sources.is_null() {
            return Err(null("sources"));
        }
        if n_sources == 0 {
            return Err(Fail(
                vdisk_status::InvalidArgument,
                "an ISO needs at least one source".into(),
            ));
        }
        let mut o = crate::iso::IsoOptions::from_env()?;
        if let Some(spec) = opt_text(options) {
            o.apply(&spec)?;
        }
        let date = o.date.unwrap_or_else(crate::civil::now_secs);
        let mut tree = crate::iso::Tree::new(crate::iso::Meta::made(libc::S_IFDIR | 0o755, date));
        for i in 0..n_sources {
            // SAFETY: `sources` points at `n_sources` pointers, as documented.
            let s = unsafe { *sources.add(i) };
            tree.add_source(&path_arg(s, "source")?)?;
        }
        crate::iso::write_iso(&tree, &o, &dst)?;
        Ok(())
    })
}

/// Write a cloud-init NoCloud seed disk at `dst`: an ISO labelled `cidata` holding the file
/// `user_data` as `user-data`, `meta_data` as `meta-data` (NULL: an instance id hashed from
/// the other files), and `network_config` / `vendor_data` when not NULL; `format` is a
/// `vdisk_format` (raw: the ISO itself, or qcow2). `SOURCE_DATE_EPOCH` fixes its dates.
///
/// # Safety
/// `user_data` and `dst` are NUL-terminated; the other paths are NULL or NUL-terminated;
/// `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_cidata(
    user_data: *const c_char,
    meta_data: *const c_char,
    network_config: *const c_char,
    vendor_data: *const c_char,
    dst: *const c_char,
    format: u32,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let optional = |p: *const c_char, what: &str| -> Result<Option<std::path::PathBuf>, Fail> {
            if p.is_null() {
                Ok(None)
            } else {
                path_arg(p, what).map(Some)
            }
        };
        let seed = crate::iso::Seed {
            user_data: path_arg(user_data, "user_data")?,
            meta_data: optional(meta_data, "meta_data")?,
            network_config: optional(network_config, "network_config")?,
            vendor_data: optional(vendor_data, "vendor_data")?,
        };
        let dst = path_arg(dst, "dst")?;
        let target = match vdisk_format::from_c(format)? {
            vdisk_format::Raw => crate::convert::Target::Raw,
            vdisk_format::Qcow2 => crate::convert::Target::Qcow2 {
                options: CreateOptions::default(),
                compress: false,
            },
        };
        let date = crate::civil::source_date_epoch()?;
        crate::iso::write_seed(&seed, &dst, &target, date)?;
        Ok(())
    })
}
