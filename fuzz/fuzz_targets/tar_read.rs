//! Read arbitrary bytes with the bounded tar reader: every entry's logical content to its
//! end. Nothing may panic, a read must never yield more than the entry's logical size, and a
//! sparse entry's map must account for exactly its stored data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Read;

fuzz_target!(|data: &[u8]| {
    let mut ar = vdisk::archive::tar::TarReader::new(data);
    let mut buf = vec![0u8; 4096];
    for _ in 0..1000 {
        let e = match ar.next_entry() {
            Ok(Some(e)) => e,
            _ => return,
        };
        if let Some(map) = &e.sparse {
            assert_eq!(map.iter().map(|s| s.1).sum::<u64>(), e.data_size);
        }
        // Huge sparse sizes are legal; read a bounded prefix of the content.
        let mut got = 0u64;
        while got < 1 << 22 {
            match ar.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(_) => return,
            }
        }
        assert!(got <= e.size, "read {got} bytes of a {}-byte entry", e.size);
        if got < 1 << 22 {
            assert_eq!(got, e.size, "entry ended early without an error");
        }
    }
});
