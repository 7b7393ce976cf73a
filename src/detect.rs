//! Format detection from an image's first bytes (and, for fixed VHD, its last 512).
//!
//! The magic table is CDI's (gz, xz, zstd, qcow2, ustar, vmdk, vdi, vhd, vhdx) plus ISO 9660
//! (`CD001` at 0x8001), the fixed-VHD footer and qcow version 1. Detection never follows
//! anything the bytes name; it only classifies them.

use std::fmt;

/// How many leading bytes [`probe`] wants to see (ISO's descriptor sits at 0x8001).
pub const PROBE_LEN: usize = 0x8006;

/// Every format the library recognises, readable or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// ISO 9660 filesystem image (content is read as raw).
    Iso,
    /// QEMU qcow version 1 (recognised, not read).
    Qcow1,
    /// gzip stream.
    Gzip,
    /// xz stream.
    Xz,
    /// zstd stream.
    Zstd,
    /// POSIX/GNU tar archive.
    Tar,
    /// VMware sparse extent or descriptor.
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
    /// Virtual PC dynamic disk (header copy at offset 0).
    Vhd,
    /// Virtual PC fixed disk (footer only, at the end).
    VhdFixed,
    /// Hyper-V VHDX.
    Vhdx,
}

impl Format {
    /// The name qemu-img uses (`raw`, `qcow2`, `vpc`, ...), or ours where qemu has none.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Iso => "iso",
            Format::Qcow1 => "qcow",
            Format::Gzip => "gzip",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Tar => "tar",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhd | Format::VhdFixed => "vpc",
            Format::Vhdx => "vhdx",
        }
    }

    /// Parse a format name as given to `-f`/`-O` (qemu-img's names; `vhd` is accepted for `vpc`).
    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "iso" => Format::Iso,
            "qcow" => Format::Qcow1,
            "gzip" | "gz" => Format::Gzip,
            "xz" => Format::Xz,
            "zstd" | "zst" => Format::Zstd,
            "tar" => Format::Tar,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "vpc" | "vhd" => Format::Vhd,
            "vhdx" => Format::Vhdx,
            _ => return None,
        })
    }

    /// True for compression wrappers and archives (a stream around an image).
    pub fn is_stream(self) -> bool {
        matches!(self, Format::Gzip | Format::Xz | Format::Zstd | Format::Tar)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn at(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    buf.get(off..off + magic.len()) == Some(magic)
}

/// Classify an image from its first bytes `head` (ideally [`PROBE_LEN`] of them, fewer when the
/// file is shorter) and, when known, its last 512 bytes `tail` (for the fixed-VHD footer).
/// Anything unrecognised is [`Format::Raw`].
pub fn probe(head: &[u8], tail: Option<&[u8]>) -> Format {
    if at(head, 0, b"QFI\xfb") {
        return match head.get(4..8) {
            Some([0, 0, 0, 1]) => Format::Qcow1,
            _ => Format::Qcow2,
        };
    }
    if at(head, 0, &[0x1f, 0x8b]) {
        return Format::Gzip;
    }
    if at(head, 0, &[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Format::Xz;
    }
    if at(head, 0, &[0x28, 0xb5, 0x2f, 0xfd]) {
        return Format::Zstd;
    }
    if at(head, 0, b"KDMV") || at(head, 0, b"# Disk DescriptorFile") {
        return Format::Vmdk;
    }
    if at(head, 0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        return Format::Vdi;
    }
    if at(head, 0, b"conectix") {
        return Format::Vhd;
    }
    if at(head, 0, b"vhdxfile") {
        return Format::Vhdx;
    }
    if at(head, 0x101, b"ustar") {
        return Format::Tar;
    }
    if at(head, 0x8001, b"CD001") {
        return Format::Iso;
    }
    if let Some(t) = tail {
        if t.len() == 512 && at(t, 0, b"conectix") {
            return Format::VhdFixed;
        }
    }
    Format::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_table() {
        let mut b = vec![0u8; PROBE_LEN];
        assert_eq!(probe(&b, None), Format::Raw);
        b[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        assert_eq!(probe(&b, None), Format::Qcow2);
        b[..8].copy_from_slice(b"QFI\xfb\0\0\0\x01");
        assert_eq!(probe(&b, None), Format::Qcow1);
        let mut b = vec![0u8; PROBE_LEN];
        b[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(probe(&b, None), Format::Iso);
        let mut b = vec![0u8; 600];
        b[0x101..0x106].copy_from_slice(b"ustar");
        assert_eq!(probe(&b, None), Format::Tar);
        let mut tail = vec![0u8; 512];
        tail[..8].copy_from_slice(b"conectix");
        assert_eq!(probe(&[0u8; 10], Some(&tail)), Format::VhdFixed);
        assert_eq!(probe(&[0x1f, 0x8b, 8], None), Format::Gzip);
        assert_eq!(probe(&[0x28, 0xb5, 0x2f, 0xfd], None), Format::Zstd);
        assert_eq!(probe(b"\xfd7zXZ\0..", None), Format::Xz);
        assert_eq!(probe(b"vhdxfile", None), Format::Vhdx);
        assert_eq!(probe(b"KDMV....", None), Format::Vmdk);
        let mut b = vec![0u8; 0x44];
        b[0x40..].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe(&b, None), Format::Vdi);
        assert_eq!(probe(&[], None), Format::Raw);
    }

    #[test]
    fn names_round_trip() {
        for f in [
            Format::Raw,
            Format::Qcow2,
            Format::Vmdk,
            Format::Vdi,
            Format::Vhdx,
            Format::Xz,
        ] {
            assert_eq!(Format::from_name(f.name()), Some(f));
        }
    }
}
