//! Read arbitrary bytes as a multipart/form-data body (boundary `bnd`), every part to its end,
//! with read sizes picked by the first byte. It must parse or refuse, never panic or hang;
//! no part's data may hold a delimiter, a malformed body's error must stick, and the bytes
//! handed out cannot exceed the input.
#![no_main]

use std::io::{BufRead, Read};

use libfuzzer_sys::fuzz_target;
use vdisk::net::multipart::{Multipart, boundary};

const DELIM: &[u8] = b"\r\n--bnd";

/// Hands out at most `max` bytes per read.
struct Chunks<'a> {
    data: &'a [u8],
    max: usize,
}

impl Read for Chunks<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.max.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let _ = boundary(&String::from_utf8_lossy(&body[..body.len().min(256)]));
    let max = [1, 2, 7, 64, 4096, 1 << 20][usize::from(sel & 7) % 6];
    let out_len = 1 + usize::from(sel >> 3) * 37;
    let mut mp = Multipart::new(Chunks { data: body, max }, "bnd");
    let mut total = 0;
    loop {
        match mp.next_part() {
            Ok(Some(_)) => {}
            Ok(None) => {
                assert!(mp.next_part().unwrap().is_none());
                break;
            }
            Err(_) => {
                // The input never fails to read: every error is the body's and sticks.
                assert!(mp.next_part().is_err());
                break;
            }
        }
        let mut part = Vec::new();
        let mut r = mp.part_reader();
        let res = if sel & 0x80 == 0 {
            let mut buf = vec![0u8; out_len];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => part.extend_from_slice(&buf[..n]),
                    Err(e) => break Err(e),
                }
            }
        } else {
            loop {
                match r.fill_buf() {
                    Ok([]) => break Ok(()),
                    Ok(b) => {
                        let n = b.len().min(out_len);
                        part.extend_from_slice(&b[..n]);
                        r.consume(n);
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        total += part.len();
        assert!(total <= body.len());
        // A delimiter in the data is only ever `--bnd` followed by some other byte.
        let mut i = 0;
        while let Some(p) = part[i..].windows(DELIM.len()).position(|w| w == DELIM) {
            let after = part.get(i + p + DELIM.len());
            assert!(
                after.is_some_and(|b| !b"- \t\r\n".contains(b)),
                "delimiter in part data"
            );
            i += p + 1;
        }
        if res.is_err() {
            assert!(r.read(&mut [0u8; 4]).is_err());
            assert!(mp.next_part().is_err());
            break;
        }
    }
});
