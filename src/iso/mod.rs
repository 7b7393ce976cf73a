//! ISO 9660. Reading: the primary volume descriptor (volume id, logical block size, volume
//! space size); the content of an ISO is read and converted as raw, as qemu does. Writing:
//! [`Tree`] gathers what goes in, [`write_iso`] / [`write_iso_to`] lay it out with Joliet and
//! Rock Ridge and write it in one pass, and [`cidata`] makes cloud-init NoCloud seeds.

pub mod cidata;
pub mod names;
pub mod tree;
pub mod write;

pub use cidata::{Seed, write_seed};
pub use tree::{Meta, Tree};
pub use write::{IsoOptions, IsoReport, iso_size, write_iso, write_iso_to};

use crate::error::{Result, corrupt};

/// Byte offset of the first volume descriptor (sector 16 of 2048 bytes).
pub const DESCRIPTORS_START: u64 = 16 * 2048;
/// How many descriptors we look through for the primary one.
const MAX_DESCRIPTORS: u64 = 64;

/// What the primary volume descriptor says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoInfo {
    /// Volume identifier, trailing spaces removed.
    pub volume_id: String,
    /// Logical block size in bytes (2048 in practice).
    pub block_size: u16,
    /// Volume size in logical blocks.
    pub volume_space_size: u32,
}

impl IsoInfo {
    /// Volume size in bytes.
    pub fn volume_bytes(&self) -> u64 {
        u64::from(self.volume_space_size) * u64::from(self.block_size)
    }
}

/// Parse one 2048-byte volume descriptor; `Ok(None)` if it is not the primary one.
pub fn parse_descriptor(sector: &[u8]) -> Result<Option<IsoInfo>> {
    if sector.len() < 2048 || &sector[1..6] != b"CD001" {
        return Err(corrupt!("not an ISO 9660 volume descriptor"));
    }
    if sector[0] != 1 {
        return Ok(None);
    }
    let le32 = u32::from_le_bytes([sector[80], sector[81], sector[82], sector[83]]);
    let be32 = u32::from_be_bytes([sector[84], sector[85], sector[86], sector[87]]);
    let le16 = u16::from_le_bytes([sector[128], sector[129]]);
    let be16 = u16::from_be_bytes([sector[130], sector[131]]);
    if le32 != be32 || le16 != be16 {
        return Err(corrupt!(
            "ISO 9660 primary volume descriptor has inconsistent both-endian fields"
        ));
    }
    if !(512..=32768).contains(&le16) || !le16.is_power_of_two() {
        return Err(corrupt!("ISO 9660 logical block size {le16} is invalid"));
    }
    let volume_id = String::from_utf8_lossy(&sector[40..72])
        .trim_end_matches([' ', '\0'])
        .to_string();
    Ok(Some(IsoInfo {
        volume_id,
        block_size: le16,
        volume_space_size: le32,
    }))
}

/// Find the primary volume descriptor with `read(offset, buf)` reading 2048-byte sectors.
pub fn read_info(mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>) -> Result<IsoInfo> {
    let mut sector = vec![0u8; 2048];
    for i in 0..MAX_DESCRIPTORS {
        read(DESCRIPTORS_START + i * 2048, &mut sector)
            .map_err(|e| crate::error::Error::io("cannot read ISO volume descriptor", e))?;
        if &sector[1..6] != b"CD001" {
            break;
        }
        if sector[0] == 255 {
            break;
        }
        if let Some(info) = parse_descriptor(&sector)? {
            return Ok(info);
        }
    }
    Err(corrupt!("ISO 9660 image has no primary volume descriptor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvd(id: &str, blocks: u32) -> Vec<u8> {
        let mut s = vec![0u8; 2048];
        s[0] = 1;
        s[1..6].copy_from_slice(b"CD001");
        s[6] = 1;
        s[40..72].fill(b' ');
        s[40..40 + id.len()].copy_from_slice(id.as_bytes());
        s[80..84].copy_from_slice(&blocks.to_le_bytes());
        s[84..88].copy_from_slice(&blocks.to_be_bytes());
        s[128..130].copy_from_slice(&2048u16.to_le_bytes());
        s[130..132].copy_from_slice(&2048u16.to_be_bytes());
        s
    }

    #[test]
    fn parses_pvd_and_rejects_inconsistency() {
        let i = parse_descriptor(&pvd("CIDATA", 183)).unwrap().unwrap();
        assert_eq!(i.volume_id, "CIDATA");
        assert_eq!(i.volume_bytes(), 183 * 2048);
        let mut bad = pvd("X", 10);
        bad[84] = 9;
        assert!(parse_descriptor(&bad).is_err());
        let mut svd = pvd("X", 10);
        svd[0] = 2;
        assert_eq!(parse_descriptor(&svd).unwrap(), None);
    }
}
