//! The one-verdict rule, fuzzed for the formats the importer streams front to back
//! (`src/forward.rs`): dynamic VHD, VDI and VMDK. The same bytes opened as a file (random
//! access, untrusted policy, format detected as the stream detects it) and streamed through
//! the importer must give the same verdict (see `shared/differential.rs`). Any disagreement
//! panics.
#![no_main]

#[path = "shared/differential.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;

/// VDI's signature (little-endian) at offset 0x40.
const VDI_SIGNATURE: [u8; 4] = 0xbeda_107f_u32.to_le_bytes();

fuzz_target!(|data: &[u8]| {
    // Dynamic VHD (the footer's copy at 0), VDI, VMDK sparse extent; nothing else.
    let vhd = data.starts_with(b"conectix");
    let vdi = data.get(0x40..0x44) == Some(&VDI_SIGNATURE[..]);
    let vmdk = data.starts_with(b"KDMV");
    if !(vhd || vdi || vmdk) {
        return;
    }
    shared::differential(data, None);
});
