//! The ISO writer on arbitrary trees: paths, file contents and link targets come from the
//! input (names of any bytes and lengths, deep paths, duplicates, long link targets). Building
//! the tree must refuse or succeed, never panic; a written image must be whole sectors, as long
//! as planned, with a primary descriptor that says so, and must read back, through the
//! ISO 9660 records and Rock Ridge entries (continuation areas followed), as exactly the
//! files and links that went in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use vdisk::iso::{IsoOptions, Tree, iso_size, parse_descriptor, write_iso_to};

#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File(Vec<u8>),
    Link(Vec<u8>),
}

fn both32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Rock Ridge name and link target of a record's system-use area, following `CE`.
fn rock_ridge<'a>(img: &'a [u8], mut su: &'a [u8], hops: &mut u32) -> (Vec<u8>, Option<Vec<u8>>) {
    let (mut name, mut link, mut link_open) = (Vec::new(), None::<Vec<u8>>, false);
    let mut next: Option<&[u8]> = None;
    loop {
        while su.len() >= 4 {
            let len = su[2] as usize;
            assert!(len >= 4 && len <= su.len(), "bad SUSP entry length");
            let (e, rest) = su.split_at(len);
            match &e[..2] {
                b"NM" => name.extend_from_slice(&e[5..]),
                b"CE" => {
                    let (lba, off, n) = (both32(&e[4..]), both32(&e[12..]), both32(&e[20..]));
                    let at = lba as usize * 2048 + off as usize;
                    assert!(
                        off as usize + n as usize <= 2048,
                        "continuation area crosses a sector"
                    );
                    next = Some(&img[at..at + n as usize]);
                }
                b"SL" => {
                    let l = link.get_or_insert_with(Vec::new);
                    let mut c = &e[5..];
                    while c.len() >= 2 {
                        let (flags, n) = (c[0], c[1] as usize);
                        if !link_open && !(l.is_empty()) && l != b"/" {
                            l.push(b'/');
                        }
                        match flags & 0x0e {
                            0x02 => l.push(b'.'),
                            0x04 => l.extend_from_slice(b".."),
                            0x08 => l.push(b'/'),
                            _ => l.extend_from_slice(&c[2..2 + n]),
                        }
                        link_open = flags & 1 != 0;
                        c = &c[2 + n..];
                    }
                }
                _ => {}
            }
            su = rest;
        }
        match next.take() {
            Some(area) => {
                *hops += 1;
                assert!(*hops < 10_000, "continuation loop");
                su = area;
            }
            None => return (name, link),
        }
    }
}

fn walk(
    img: &[u8],
    lba: u32,
    size: u32,
    path: &[u8],
    out: &mut BTreeMap<Vec<u8>, Entry>,
    depth: u32,
) {
    assert!(depth < 10, "directory loop");
    let start = lba as usize * 2048;
    let dir = &img[start..start + size as usize];
    let mut pending: Option<(Vec<u8>, Vec<u8>)> = None;
    for sector in dir.chunks(2048) {
        let mut i = 0;
        while i < sector.len() && sector[i] != 0 {
            let r = &sector[i..i + sector[i] as usize];
            i += r.len();
            let (elba, elen, flags, idlen) =
                (both32(&r[2..]), both32(&r[10..]), r[25], r[32] as usize);
            let id = &r[33..33 + idlen];
            if id == [0] || id == [1] {
                continue;
            }
            let su = &r[33 + idlen + (1 - idlen % 2)..];
            let (name, link) = rock_ridge(img, su, &mut 0);
            let mut p = path.to_vec();
            p.push(b'/');
            p.extend_from_slice(&name);
            if flags & 2 != 0 {
                walk(img, elba, elen, &p, out, depth + 1);
            } else if let Some(l) = link {
                out.insert(p, Entry::Link(l));
            } else {
                let data = &img[elba as usize * 2048..elba as usize * 2048 + elen as usize];
                let acc = match pending.take() {
                    Some((q, mut acc)) if q == p => {
                        acc.extend_from_slice(data);
                        acc
                    }
                    _ => data.to_vec(),
                };
                if flags & 0x80 != 0 {
                    pending = Some((p, acc));
                } else {
                    out.insert(p, Entry::File(acc));
                }
            }
        }
    }
}

/// The link target as the writer records it: empty components dropped.
fn normal_target(t: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = if t.first() == Some(&b'/') {
        b"/".to_vec()
    } else {
        Vec::new()
    };
    let parts: Vec<&[u8]> = t.split(|&b| b == b'/').filter(|p| !p.is_empty()).collect();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(p);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let opts = IsoOptions {
        volume_id: "FUZZ".into(),
        joliet: flags & 1 != 0,
        rock_ridge: true,
        level: 1 + (flags >> 1) % 3,
        date: Some(i64::from(flags) * 100_000_000 - 3_000_000_000),
        rational: flags & 8 != 0,
        application: "VDISK".into(),
    };
    let mut tree = Tree::default();
    let mut want: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    for chunk in rest.split(|&b| b == 0).take(200) {
        let Some((&op, body)) = chunk.split_first() else {
            continue;
        };
        let (path, payload) = match body.iter().position(|&b| b == 1) {
            Some(i) => (&body[..i], &body[i + 1..]),
            None => (body, &[][..]),
        };
        let path = String::from_utf8_lossy(path).into_owned();
        let key: Vec<u8> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .flat_map(|c| [b"/".as_slice(), c.as_bytes()].concat())
            .collect();
        let ok = if op % 2 == 0 {
            // Repeat the payload to reach sizes that span sectors.
            let data = payload.repeat(1 + usize::from(op) * 4);
            let ok = tree.add_bytes(&path, data.clone(), 0o644, 0).is_ok();
            if ok {
                want.insert(key, Entry::File(data));
            }
            ok
        } else {
            let target = payload.repeat(1 + usize::from(op) / 16);
            let ok = tree.add_symlink(&path, &target, 0).is_ok();
            if ok {
                want.insert(key, Entry::Link(normal_target(&target)));
            }
            ok
        };
        let _ = ok;
    }
    let mut img = Vec::new();
    let report = match write_iso_to(&tree, &opts, &mut img) {
        Ok(r) => r,
        Err(_) => return,
    };
    assert_eq!(report.bytes as usize, img.len());
    assert_eq!(img.len() % 2048, 0);
    assert_eq!(iso_size(&tree, &opts).unwrap(), img.len() as u64);
    let info = parse_descriptor(&img[16 * 2048..17 * 2048])
        .unwrap()
        .unwrap();
    assert_eq!(info.volume_bytes(), img.len() as u64);
    let pvd = &img[16 * 2048..17 * 2048];
    let root = &pvd[156..190];
    let mut got = BTreeMap::new();
    walk(
        &img,
        both32(&root[2..]),
        both32(&root[10..]),
        b"",
        &mut got,
        0,
    );
    // Only leaves are compared: directories made on the way have no entry of their own.
    assert_eq!(got, want);
});
