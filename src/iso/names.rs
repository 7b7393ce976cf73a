//! The identifiers an ISO directory gives its entries: ISO 9660 names (d-characters only, 8.3
//! at level 1, up to 30/31 characters at levels 2 and 3, `;1` on files) and Joliet names
//! (UCS-2 big-endian, at most 64 characters, no `* / : ; ? \` or control characters), made
//! unique within their directory and ordered as ECMA-119 9.3 sorts directory records. The
//! real names travel in Rock Ridge `NM` entries and in the Joliet tree; these are what readers
//! without those extensions see.

use std::collections::HashSet;

/// Longest Joliet name, in UCS-2 units.
pub const JOLIET_MAX: usize = 64;

/// Name limits of one interchange level.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Longest file name part plus extension part.
    file_total: usize,
    /// Longest file name part.
    file_base: usize,
    /// Longest extension.
    file_ext: usize,
    /// Longest directory name.
    dir: usize,
}

fn limits(level: u8) -> Limits {
    if level <= 1 {
        Limits {
            file_total: 11,
            file_base: 8,
            file_ext: 3,
            dir: 8,
        }
    } else {
        Limits {
            file_total: 30,
            file_base: 30,
            file_ext: 30,
            dir: 31,
        }
    }
}

fn d_char(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => b.to_ascii_uppercase(),
        b'A'..=b'Z' | b'0'..=b'9' | b'_' => b,
        _ => b'_',
    }
}

/// The (name, extension) an ISO 9660 identifier sorts by.
pub fn sort_key(id: &[u8]) -> (&[u8], &[u8]) {
    let id = id.strip_suffix(b";1").unwrap_or(id);
    match id.iter().position(|&b| b == b'.') {
        Some(i) => (&id[..i], &id[i + 1..]),
        None => (id, &[][..]),
    }
}

/// ISO 9660 identifiers for the entries of one directory, given as (real name, is a
/// directory) in any order; the answer is in the same order.
pub fn iso_names(entries: &[(&[u8], bool)], level: u8) -> Vec<Vec<u8>> {
    let l = limits(level);
    let mut used: HashSet<Vec<u8>> = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for &(name, is_dir) in entries {
        let (base, ext): (Vec<u8>, Vec<u8>) = if is_dir {
            (name.iter().map(|&b| d_char(b)).collect(), Vec::new())
        } else {
            match name.iter().rposition(|&b| b == b'.') {
                Some(i) if i > 0 => (
                    name[..i].iter().map(|&b| d_char(b)).collect(),
                    name[i + 1..].iter().map(|&b| d_char(b)).collect(),
                ),
                _ => (name.iter().map(|&b| d_char(b)).collect(), Vec::new()),
            }
        };
        let (max_base, ext) = if is_dir {
            (l.dir, ext)
        } else {
            let ext: Vec<u8> = ext.into_iter().take(l.file_ext).collect();
            (l.file_base.min(l.file_total - ext.len()), ext)
        };
        let mut base: Vec<u8> = base.into_iter().take(max_base).collect();
        if base.is_empty() && ext.is_empty() {
            base.push(b'_');
        }
        let make = |base: &[u8]| -> Vec<u8> {
            let mut id = base.to_vec();
            if !is_dir {
                id.push(b'.');
                id.extend_from_slice(&ext);
                id.extend_from_slice(b";1");
            }
            id
        };
        let mut id = make(&base);
        let mut n: u64 = 0;
        while used.contains(&id) {
            n += 1;
            let digits = n.to_string();
            let keep = max_base.saturating_sub(digits.len()).min(base.len());
            let mut b = base[..keep].to_vec();
            b.extend_from_slice(digits.as_bytes());
            id = make(&b);
        }
        used.insert(id.clone());
        out.push(id);
    }
    out
}

fn joliet_unit(c: char) -> u16 {
    let v = c as u32;
    if v < 0x20 || matches!(c, '*' | '/' | ':' | ';' | '?' | '\\') || v > 0xFFFF {
        u16::from(b'_')
    } else {
        v as u16
    }
}

/// Joliet names (UCS-2 units) for the entries of one directory, same order as given.
pub fn joliet_names(entries: &[(&[u8], bool)]) -> Vec<Vec<u16>> {
    let mut used: HashSet<Vec<u16>> = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for &(name, is_dir) in entries {
        let units: Vec<u16> = String::from_utf8_lossy(name)
            .chars()
            .map(joliet_unit)
            .collect();
        // Keep an extension of up to 5 units when the name has to be cut.
        let split = if is_dir {
            units.len()
        } else {
            match units.iter().rposition(|&u| u == u16::from(b'.')) {
                Some(i) if i > 0 && units.len() - i <= 6 => i,
                _ => units.len(),
            }
        };
        let (stem, ext) = units.split_at(split);
        let make = |suffix: &[u16]| -> Vec<u16> {
            let room = JOLIET_MAX - ext.len() - suffix.len();
            let mut v: Vec<u16> = stem.iter().copied().take(room).collect();
            v.extend_from_slice(suffix);
            v.extend_from_slice(ext);
            v
        };
        let mut id = make(&[]);
        let mut n: u64 = 0;
        while used.contains(&id) {
            n += 1;
            let digits: Vec<u16> = n.to_string().bytes().map(u16::from).collect();
            id = make(&digits);
        }
        used.insert(id.clone());
        out.push(id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_one_names() {
        let e: Vec<(&[u8], bool)> = vec![
            (b"user-data", false),
            (b"meta-data", false),
            (b"network-config", false),
            (b"a.tar.gz", false),
            (b".bashrc", false),
            (b"Long Directory", true),
            (b"long directory", true),
            (b"x.y", true),
        ];
        let n = iso_names(&e, 1);
        let s: Vec<String> = n
            .iter()
            .map(|v| String::from_utf8(v.clone()).unwrap())
            .collect();
        assert_eq!(
            s,
            [
                "USER_DAT.;1",
                "META_DAT.;1",
                "NETWORK_.;1",
                "A_TAR.GZ;1",
                "_BASHRC.;1",
                "LONG_DIR",
                "LONG_DI1",
                "X_Y"
            ]
        );
        let n2 = iso_names(&e, 2);
        assert_eq!(n2[2], b"NETWORK_CONFIG.;1");
        assert_eq!(sort_key(b"A_TAR.GZ;1"), (&b"A_TAR"[..], &b"GZ"[..]));
    }

    #[test]
    fn joliet_names_are_cut_and_unique() {
        let long = "x".repeat(100) + ".iso";
        let e: Vec<(&[u8], bool)> = vec![
            (long.as_bytes(), false),
            (long.as_bytes(), false),
            ("a:b?c".as_bytes(), false),
            ("snow\u{2603}\u{1F600}".as_bytes(), false),
        ];
        let n = joliet_names(&e);
        assert_eq!(n[0].len(), 64);
        assert!(String::from_utf16(&n[0]).unwrap().ends_with("x.iso"));
        assert!(String::from_utf16(&n[1]).unwrap().ends_with("x1.iso"));
        assert_eq!(String::from_utf16(&n[2]).unwrap(), "a_b_c");
        assert_eq!(String::from_utf16(&n[3]).unwrap(), "snow\u{2603}_");
    }
}
