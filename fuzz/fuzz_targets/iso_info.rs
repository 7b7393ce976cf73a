//! ISO 9660 volume descriptors from arbitrary bytes: the descriptor parser directly, and the
//! whole open path (detection, descriptor scan, `info`) with the input placed at sector 16.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::info::ImageInfo;
use vdisk::io::MemIo;
use vdisk::iso::{DESCRIPTORS_START, parse_descriptor, read_info};
use vdisk::{Image, OpenOptions, Policy};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(info)) = parse_descriptor(data) {
        assert!(info.block_size.is_power_of_two());
        let _ = info.volume_bytes();
    }
    // The descriptor scan over the input as a sequence of sectors.
    let _ = read_info(|off, buf| {
        let start = off.checked_sub(DESCRIPTORS_START).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "before descriptors")
        })? as usize;
        let src = data.get(start..).unwrap_or(&[]);
        if src.len() < buf.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&src[..buf.len()]);
        Ok(())
    });
    // As a whole image: 16 system sectors, then the input.
    let mut image = vec![0u8; DESCRIPTORS_START as usize];
    image.extend_from_slice(data);
    let opts = OpenOptions {
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    if let Ok(img) = Image::from_io(Arc::new(MemIo::new(image)), &opts) {
        if let Ok(info) = ImageInfo::new(&img, "fuzz.iso") {
            let _ = info.to_json().to_string();
            let _ = info.to_human();
        }
        let mut b = [0u8; 512];
        let _ = img.read_at(&mut b, 0);
    }
});
