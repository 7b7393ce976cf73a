//! C ABI for building containerDisks (`vdisk::containerdisk::build`): an options builder, a
//! report struct with the digests, and the call.

use super::{
    CEnum, Fail, boundary, c_enum, null, path_arg, vdisk_error, vdisk_status, with_builder,
    with_builder_enum,
};
use crate::containerdisk::{BuildOptions, Destination, LayerCompression, build};
use crate::convert::Target;
use crate::qcow2::writer::CreateOptions;
use std::ffi::{CStr, c_char};

/// How the layer of `vdisk_containerdisk_build` is compressed.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_layer_compression {
    /// gzip, level 6 (every reader).
    Gzip = 0,
    /// zstd, level 3.
    Zstd = 1,
}

c_enum!(vdisk_layer_compression: Gzip, Zstd);

/// What `vdisk_containerdisk_build` does to the disk on the way.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum vdisk_disk_conversion {
    /// Ship it as it is (raw or qcow2 without backing or data file; others are refused).
    None = 0,
    /// Convert to raw.
    Raw = 1,
    /// Convert to qcow2 (flattening any backing chain).
    Qcow2 = 2,
    /// Convert to qcow2 with compressed clusters.
    Qcow2Compressed = 3,
}

c_enum!(vdisk_disk_conversion: None, Raw, Qcow2, Qcow2Compressed);

/// How `vdisk_containerdisk_build` works. Made by `vdisk_containerdisk_options_new` with the
/// defaults: the disk as it is, named `disk.img`, a gzip layer, this host's architecture, no
/// labels or environment, time stamps 0, TLS verified against the system's CA certificates.
/// Not safe to change from several threads at once.
pub struct vdisk_containerdisk_options {
    inner: BuildOptions,
}

/// New containerDisk options with the defaults; free with `vdisk_containerdisk_options_free`.
#[unsafe(no_mangle)]
pub extern "C" fn vdisk_containerdisk_options_new() -> *mut vdisk_containerdisk_options {
    Box::into_raw(Box::new(vdisk_containerdisk_options {
        inner: BuildOptions::default(),
    }))
}

/// Free containerDisk options. NULL is a no-op.
///
/// # Safety
/// `o` is NULL or options from `vdisk_containerdisk_options_new` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_free(o: *mut vdisk_containerdisk_options) {
    if !o.is_null() {
        // SAFETY: `o` came from `Box::into_raw` here and is freed only once.
        drop(unsafe { Box::from_raw(o) });
    }
}

/// Set the layer compression (a `vdisk_layer_compression` value).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_set_compression(
    o: *mut vdisk_containerdisk_options,
    compression: u32,
) -> vdisk_status {
    with_builder_enum(o, compression, |o: &mut vdisk_containerdisk_options, c| {
        o.inner.compression = match c {
            vdisk_layer_compression::Gzip => LayerCompression::Gzip,
            vdisk_layer_compression::Zstd => LayerCompression::Zstd,
        };
    })
}

/// Set the conversion on the way (a `vdisk_disk_conversion` value).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_set_conversion(
    o: *mut vdisk_containerdisk_options,
    conversion: u32,
) -> vdisk_status {
    with_builder_enum(o, conversion, |o: &mut vdisk_containerdisk_options, c| {
        let qcow2 = |compress| Target::Qcow2 {
            options: CreateOptions::default(),
            compress,
        };
        o.inner.convert = match c {
            vdisk_disk_conversion::None => None,
            vdisk_disk_conversion::Raw => Some(Target::Raw),
            vdisk_disk_conversion::Qcow2 => Some(qcow2(false)),
            vdisk_disk_conversion::Qcow2Compressed => Some(qcow2(true)),
        };
    })
}

/// A UTF-8 string argument.
fn str_arg(p: *const c_char, what: &str) -> Result<String, Fail> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL and documented to be a NUL-terminated string valid for the call.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(str::to_string).map_err(|_| {
        Fail(
            vdisk_status::InvalidArgument,
            format!("{what} is not UTF-8"),
        )
    })
}

/// Apply `f` to the options behind `o` with string arguments checked first.
fn with_strings(
    o: *mut vdisk_containerdisk_options,
    args: &[(*const c_char, &str)],
    f: impl FnOnce(&mut BuildOptions, Vec<String>),
) -> vdisk_status {
    let mut v = Vec::new();
    for (p, what) in args {
        match str_arg(*p, what) {
            Ok(s) => v.push(s),
            Err(Fail(s, _)) => return s,
        }
    }
    with_builder(o, |o: &mut vdisk_containerdisk_options| f(&mut o.inner, v))
}

/// Set the image architecture, GOARCH spelling (`amd64`, `arm64`, ...; checked by the build).
///
/// # Safety
/// `o` is NULL or live options; `arch` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_set_architecture(
    o: *mut vdisk_containerdisk_options,
    arch: *const c_char,
) -> vdisk_status {
    with_strings(o, &[(arch, "arch")], |o, mut v| {
        o.architecture = v.remove(0)
    })
}

/// Set the disk's file name under `disk/` (default `disk.img`; checked by the build).
///
/// # Safety
/// `o` is NULL or live options; `name` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_set_disk_name(
    o: *mut vdisk_containerdisk_options,
    name: *const c_char,
) -> vdisk_status {
    with_strings(o, &[(name, "name")], |o, mut v| o.disk_name = v.remove(0))
}

/// Add (or replace) the config label `key` with `value`.
///
/// # Safety
/// `o` is NULL or live options; `key` and `value` are NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_add_label(
    o: *mut vdisk_containerdisk_options,
    key: *const c_char,
    value: *const c_char,
) -> vdisk_status {
    with_strings(o, &[(key, "key"), (value, "value")], |o, mut v| {
        let value = v.remove(1);
        o.labels.insert(v.remove(0), value);
    })
}

/// Add a config environment entry `NAME=VALUE`.
///
/// # Safety
/// `o` is NULL or live options; `entry` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_add_env(
    o: *mut vdisk_containerdisk_options,
    entry: *const c_char,
) -> vdisk_status {
    with_strings(o, &[(entry, "entry")], |o, mut v| o.env.push(v.remove(0)))
}

/// Set the time stamp of the layer's entries and the config's `created` (seconds since
/// 1970; what `SOURCE_DATE_EPOCH` gives the command line). Default: 0 and no `created`.
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_set_source_date_epoch(
    o: *mut vdisk_containerdisk_options,
    seconds: u64,
) -> vdisk_status {
    with_builder(o, |o: &mut vdisk_containerdisk_options| {
        o.inner.source_date_epoch = Some(seconds)
    })
}

/// Registry credentials for `docker://` destinations (Basic auth or the token service).
///
/// # Safety
/// `o` is NULL or live options; `user` and `password` are NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_set_credentials(
    o: *mut vdisk_containerdisk_options,
    user: *const c_char,
    password: *const c_char,
) -> vdisk_status {
    with_strings(o, &[(user, "user"), (password, "password")], |o, mut v| {
        let pass = v.remove(1);
        o.registry.credentials = Some((v.remove(0), pass));
    })
}

/// Non-zero: skip TLS verification of the registry and fall back to plain http when https
/// fails (CDI's `insecureRegistries`).
///
/// # Safety
/// `o` is NULL or live options.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_set_insecure(
    o: *mut vdisk_containerdisk_options,
    insecure: i32,
) -> vdisk_status {
    with_builder(o, |o: &mut vdisk_containerdisk_options| {
        o.inner.registry.insecure = insecure != 0
    })
}

/// Trust the CA certificates in `pem` (PEM text) for the registry, besides the system's.
///
/// # Safety
/// `o` is NULL or live options; `pem` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_options_add_ca_pem(
    o: *mut vdisk_containerdisk_options,
    pem: *const c_char,
) -> vdisk_status {
    with_strings(o, &[(pem, "pem")], |o, mut v| {
        o.registry.ca_pem.push(v.remove(0).into_bytes())
    })
}

/// Length of a digest string with its NUL: `sha256:` and 64 hex digits (written as a
/// literal in the struct below: the header has no constants).
const DIGEST_LEN: usize = 72;

/// What `vdisk_containerdisk_build` made. Digests are `sha256:<hex>`, NUL-terminated.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct vdisk_containerdisk_report {
    /// Digest of the image manifest (the image's identity).
    pub manifest_digest: [c_char; 72],
    /// Digest of the image config.
    pub config_digest: [c_char; 72],
    /// Digest of the compressed layer.
    pub layer_digest: [c_char; 72],
    /// Digest of the uncompressed layer tar (the config's diff_id).
    pub diff_id: [c_char; 72],
    /// Size of the compressed layer in bytes.
    pub layer_size: u64,
    /// Size of the disk file in the layer.
    pub disk_size: u64,
    /// Blobs sent to a registry (the others were there already).
    pub blobs_uploaded: u32,
}

fn digest_field(s: &str) -> [c_char; 72] {
    let mut out = [0 as c_char; DIGEST_LEN];
    for (o, b) in out.iter_mut().zip(s.bytes().take(DIGEST_LEN - 1)) {
        *o = b as c_char;
    }
    out
}

/// Build a KubeVirt containerDisk of the disk image at `disk` (the disk under `disk/`, owned
/// by 107:107, one layer, `FROM scratch`) and write it to `dest`: `oci-archive:PATH[:TAG]`,
/// `oci:DIR[:TAG]` or `docker://REF` (pushed). `opts` NULL uses the defaults; `report` may
/// be NULL. Memory stays bounded whatever the disk size; on failure no file is left at an
/// archive's name and a layout's `index.json` is unchanged.
///
/// # Safety
/// `disk` and `dest` are NUL-terminated strings; `opts` is NULL or live options; `report`
/// is NULL or writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn vdisk_containerdisk_build(
    disk: *const c_char,
    dest: *const c_char,
    opts: *const vdisk_containerdisk_options,
    report: *mut vdisk_containerdisk_report,
    err: *mut *mut vdisk_error,
) -> vdisk_status {
    boundary(err, || {
        let disk = path_arg(disk, "disk")?;
        let dest = Destination::parse(&str_arg(dest, "dest")?)?;
        let defaults = BuildOptions::default();
        // SAFETY: per the contract, a non-NULL `opts` is live options.
        let o = unsafe { opts.as_ref() }.map_or(&defaults, |o| &o.inner);
        let r = build(&disk, &dest, o)?;
        // SAFETY: per the contract, a non-NULL `report` is writable.
        if let Some(out) = unsafe { report.as_mut() } {
            *out = vdisk_containerdisk_report {
                manifest_digest: digest_field(&r.manifest_digest),
                config_digest: digest_field(&r.config_digest),
                layer_digest: digest_field(&r.layer_digest),
                diff_id: digest_field(&r.diff_id),
                layer_size: r.layer_size,
                disk_size: r.disk_size,
                blobs_uploaded: r.blobs_uploaded,
            };
        }
        Ok(())
    })
}
