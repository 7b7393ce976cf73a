//! What `info`, `map` and `snapshot -l` report, as data and in qemu-img's text and JSON forms
//! (same keys and layout as qemu-img 10, so scripts written for qemu-img keep working).

use crate::error::Result;
use crate::image::{Extent, Image};
use crate::iso::IsoInfo;
use crate::qcow2::Snapshot;
use crate::qcow2::header::{AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, incompat};
use crate::qjson::{QDict, QValue};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// qcow2-specific facts (qemu's `format-specific` data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// "0.10" (v2) or "1.1" (v3).
    pub compat: &'static str,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Refcount width.
    pub refcount_bits: u32,
    /// Corrupt bit set.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// External data file name.
    pub data_file: Option<String>,
    /// Data file is a valid raw image.
    pub data_file_raw: bool,
    /// Persistent dirty bitmaps.
    pub bitmaps: Vec<crate::qcow2::bitmaps::Bitmap>,
}

/// Everything `info` shows about one image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// The name as given.
    pub filename: String,
    /// qemu's format name ("raw", "qcow2").
    pub format: &'static str,
    /// Virtual disk size.
    pub virtual_size: u64,
    /// Allocated bytes of the image file, where known.
    pub actual_size: Option<u64>,
    /// Length of the image file.
    pub file_length: u64,
    /// Cluster size (qcow2).
    pub cluster_size: Option<u64>,
    /// Backing file name as stored.
    pub backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Backing format as stored.
    pub backing_format: Option<String>,
    /// Dirty bit (refcounts may be stale).
    pub dirty: bool,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// qcow2 details.
    pub qcow2: Option<Qcow2Info>,
    /// ISO 9660 volume details.
    pub iso: Option<IsoInfo>,
    /// `format-specific` of a VMDK, VHD, VHDX or VDI image, as its reader reports it.
    pub format_specific: Option<Value>,
}

impl ImageInfo {
    /// Gather the facts of `img`, naming it `filename`.
    pub fn new(img: &Image, filename: &str) -> Result<ImageInfo> {
        let file = img.file();
        // qemu reports file lengths in whole sectors.
        let file_length = file
            .size()
            .map_err(|e| crate::Error::io("cannot stat image", e))?
            .div_ceil(512)
            * 512;
        let actual_size = file.allocated_bytes().ok().flatten();
        let mut info = ImageInfo {
            filename: filename.to_string(),
            format: img.format().name(),
            virtual_size: img.virtual_size(),
            actual_size,
            file_length,
            cluster_size: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_format: None,
            dirty: false,
            snapshots: Vec::new(),
            qcow2: None,
            iso: img.iso().cloned(),
            format_specific: img.driver().and_then(|d| d.format_specific()),
        };
        if let Some(d) = img.driver() {
            info.cluster_size = d.cluster_size();
        }
        if let Some(q) = img.qcow2() {
            let h = q.header();
            info.virtual_size = h.size;
            info.cluster_size = Some(h.cluster_size());
            info.backing_filename = h.backing_file.clone();
            info.full_backing_filename = h.backing_file.as_ref().map(|b| {
                if Path::new(b).is_absolute() {
                    b.clone()
                } else {
                    match Path::new(filename).parent() {
                        Some(p) if !p.as_os_str().is_empty() => {
                            p.join(b).to_string_lossy().into_owned()
                        }
                        _ => b.clone(),
                    }
                }
            });
            info.backing_format = h.backing_format.clone();
            info.dirty = h.incompatible_features & incompat::DIRTY != 0;
            info.snapshots = q.snapshots().to_vec();
            info.qcow2 = Some(Qcow2Info {
                compat: if h.version == 2 { "0.10" } else { "1.1" },
                compression_type: h.compression_type.name(),
                lazy_refcounts: h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
                refcount_bits: h.refcount_bits(),
                corrupt: h.incompatible_features & incompat::CORRUPT != 0,
                extended_l2: h.extended_l2(),
                data_file: h.data_file.clone(),
                data_file_raw: h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0,
                bitmaps: crate::qcow2::bitmaps::list(q)?,
            });
        }
        Ok(info)
    }

    /// qemu-img's `--output=json` object, as data.
    pub fn to_json(&self) -> Value {
        self.to_qobject().to_value()
    }

    /// qemu-img's `--output=json` text, byte for byte (QEMU's key order and layout).
    pub fn to_json_text(&self) -> String {
        crate::qjson::pretty(&self.to_qobject())
    }

    /// The `--output=json` tree, keys added in the order of QEMU's schema (`BlockGraphInfo`).
    pub fn to_qobject(&self) -> QValue {
        let mut m = QDict::new();
        m.put("filename", &self.filename);
        m.put("format", self.format);
        m.put("dirty-flag", self.dirty);
        m.put_opt("actual-size", self.actual_size);
        m.put("virtual-size", self.virtual_size);
        m.put_opt("cluster-size", self.cluster_size);
        m.put_opt("backing-filename", self.backing_filename.as_ref());
        m.put_opt("full-backing-filename", self.full_backing_filename.as_ref());
        m.put_opt("backing-filename-format", self.backing_format.as_ref());
        if !self.snapshots.is_empty() {
            let snaps: Vec<QValue> = self
                .snapshots
                .iter()
                .map(|s| {
                    let mut d = QDict::new();
                    d.put("id", &s.id);
                    d.put("name", &s.name);
                    d.put("vm-state-size", s.vm_state_size);
                    d.put("date-sec", s.date_sec);
                    d.put("date-nsec", s.date_nsec);
                    d.put("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000);
                    d.put("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000);
                    d.put("icount", s.icount.unwrap_or(u64::MAX));
                    d.into()
                })
                .collect();
            m.put("snapshots", snaps);
        }
        m.put_opt("format-specific", self.format_specific_qobject());
        let mut child = QDict::new();
        child.put("filename", &self.filename);
        child.put("format", "file");
        child.put("dirty-flag", false);
        child.put_opt("actual-size", self.actual_size);
        child.put("virtual-size", self.file_length);
        let mut file_spec = QDict::new();
        file_spec.put("type", "file");
        file_spec.put("data", QDict::new());
        child.put("format-specific", file_spec);
        child.put("children", QValue::List(vec![]));
        let mut file = QDict::new();
        file.put("name", "file");
        file.put("info", child);
        m.put("children", vec![QValue::from(file)]);
        m.into()
    }

    /// The `format-specific` object (`{"type": ..., "data": {...}}`), keys in QEMU's schema
    /// order.
    fn format_specific_qobject(&self) -> Option<QValue> {
        let typed = |t: &str, data: QValue| -> QValue {
            let mut f = QDict::new();
            f.put("type", t);
            f.put("data", data);
            f.into()
        };
        let mut spec = None;
        if let Some(q) = &self.qcow2 {
            let mut d = QDict::new();
            d.put("compat", q.compat);
            if let Some(f) = &q.data_file {
                d.put("data-file", f);
                d.put("data-file-raw", q.data_file_raw);
            }
            if q.compat != "0.10" {
                d.put("extended-l2", q.extended_l2);
                d.put("lazy-refcounts", q.lazy_refcounts);
                d.put("corrupt", q.corrupt);
            }
            d.put("refcount-bits", q.refcount_bits);
            if !q.bitmaps.is_empty() {
                use crate::qcow2::bitmaps::{FLAG_AUTO, FLAG_IN_USE};
                let list: Vec<QValue> = q
                    .bitmaps
                    .iter()
                    .map(|b| {
                        let mut e = QDict::new();
                        e.put("name", &b.name);
                        e.put("granularity", 1u64 << b.granularity_bits);
                        let mut flags = Vec::new();
                        if b.flags & FLAG_IN_USE != 0 {
                            flags.push(QValue::from("in-use"));
                        }
                        if b.flags & FLAG_AUTO != 0 {
                            flags.push(QValue::from("auto"));
                        }
                        e.put("flags", flags);
                        e.into()
                    })
                    .collect();
                d.put("bitmaps", list);
            }
            d.put("compression-type", q.compression_type);
            spec = Some(typed("qcow2", d.into()));
        }
        if let Some(i) = &self.iso {
            let mut d = QDict::new();
            d.put("volume-id", &i.volume_id);
            d.put("logical-block-size", u64::from(i.block_size));
            d.put("volume-space-size", u64::from(i.volume_space_size));
            spec = Some(typed("iso9660", d.into()));
        }
        if let Some(f) = &self.format_specific {
            spec = Some(QValue::from(f));
        }
        spec
    }

    /// qemu-img's human-readable text.
    pub fn to_human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "image: {}", self.filename);
        let _ = writeln!(s, "file format: {}", self.format);
        let _ = writeln!(
            s,
            "virtual size: {} ({} bytes)",
            size_to_str(self.virtual_size),
            self.virtual_size
        );
        if let Some(a) = self.actual_size {
            let _ = writeln!(s, "disk size: {}", size_to_str(a));
        }
        if let Some(c) = self.cluster_size {
            let _ = writeln!(s, "cluster_size: {c}");
        }
        if let Some(b) = &self.backing_filename {
            match &self.full_backing_filename {
                Some(f) if f != b => {
                    let _ = writeln!(s, "backing file: {b} (actual path: {f})");
                }
                _ => {
                    let _ = writeln!(s, "backing file: {b}");
                }
            }
        }
        if let Some(b) = &self.backing_format {
            let _ = writeln!(s, "backing file format: {b}");
        }
        if self.dirty {
            let _ = writeln!(s, "cleanly shut down: no");
        }
        if !self.snapshots.is_empty() {
            s.push_str("Snapshot list:\n");
            s.push_str(&snapshot_table(&self.snapshots));
        }
        // qemu prints the format-specific data as it prints any QAPI object: its dictionary
        // in QEMU's order, '-' in keys as ' ', lists as numbered items.
        if self.iso.is_none()
            && let Some(QValue::Dict(f)) = self.format_specific_qobject()
            && let Some(d @ QValue::Dict(_)) = f.get("data")
        {
            s.push_str("Format specific information:\n");
            crate::qjson::dump_human(&mut s, d, 1);
        }
        if let Some(i) = &self.iso {
            s.push_str("Format specific information:\n");
            s.push_str("    type: iso9660\n");
            let _ = writeln!(s, "    volume id: {}", i.volume_id);
            let _ = writeln!(s, "    logical block size: {}", i.block_size);
            let _ = writeln!(s, "    volume space size: {} blocks", i.volume_space_size);
        }
        s.push_str("Child node '/file':\n");
        let _ = writeln!(s, "    filename: {}", self.filename);
        s.push_str("    protocol type: file\n");
        let _ = writeln!(
            s,
            "    file length: {} ({} bytes)",
            size_to_str(self.file_length),
            self.file_length
        );
        if let Some(a) = self.actual_size {
            let _ = writeln!(s, "    disk size: {}", size_to_str(a));
        }
        s
    }
}

/// qemu's `size_to_str`: three significant digits and a binary unit ("10 MiB", "1.5 GiB").
pub fn size_to_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut x = v as f64;
    while x >= 1024.0 * 0.95 && i + 1 < UNITS.len() && v >= 1024u64.pow(i as u32 + 1) {
        x /= 1024.0;
        i += 1;
    }
    let digits = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else {
        2
    };
    let mut t = format!("{x:.digits$}");
    if t.contains('.') {
        t = t.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{t} {}", UNITS[i])
}

fn civil(secs: i64) -> String {
    let (y, m, d, hh, mm, ss) = crate::civil::from_secs(secs);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
}

/// The snapshot table as `qemu-img snapshot -l` prints it (times in UTC).
pub fn snapshot_table(snaps: &[Snapshot]) -> String {
    let mut s = String::from(
        "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n",
    );
    for sn in snaps {
        let ms = sn.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        );
        let icount = match sn.icount {
            Some(i) if i != u64::MAX => i.to_string(),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            civil(i64::from(sn.date_sec)),
            clock,
            icount
        );
    }
    s
}

/// Walk the merged extent list of `qemu-img map` in guest order, calling `f(start, extent)`
/// for each. Memory stays constant however many extents there are (a small hostile image can
/// describe hundreds of millions), so output can be streamed as qemu-img does.
pub fn for_each_map_extent(img: &Image, f: impl FnMut(u64, &Extent) -> Result<()>) -> Result<()> {
    for_each_map_extent_in(img, 0..u64::MAX, f)
}

/// [`for_each_map_extent`] over the guest bytes `range` only (cut to the disk's end), as
/// `qemu-img map --start-offset --max-length` walks them.
pub fn for_each_map_extent_in(
    img: &Image,
    range: std::ops::Range<u64>,
    mut f: impl FnMut(u64, &Extent) -> Result<()>,
) -> Result<()> {
    let size = img.virtual_size().min(range.end);
    let mut cur: Option<(u64, Extent)> = None;
    let mut pos = range.start;
    while pos < size {
        let e = img.reported_extent(pos, size - pos)?;
        match &mut cur {
            Some((_, last)) if mergeable(last, &e) => last.len += e.len,
            _ => {
                if let Some((start, last)) = cur.replace((pos, e)) {
                    f(start, &last)?;
                }
            }
        }
        pos += e.len;
    }
    if let Some((start, last)) = cur {
        f(start, &last)?;
    }
    Ok(())
}

/// Whether `e` continues `last` in qemu-img map's merged output.
fn mergeable(last: &Extent, e: &Extent) -> bool {
    last.depth == e.depth
        && last.present == e.present
        && last.zero == e.zero
        && last.data == e.data
        && last.compressed == e.compressed
        && match (last.offset, e.offset) {
            (Some(a), Some(b)) => a.checked_add(last.len) == Some(b),
            (None, None) => true,
            _ => false,
        }
}

/// The merged extent list of `qemu-img map`, with the file each extent's depth refers to.
/// Holds every extent in memory: for untrusted images prefer [`for_each_map_extent`].
pub fn map_extents(img: &Image) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    for_each_map_extent(img, |_, e| {
        out.push(*e);
        Ok(())
    })?;
    Ok(out)
}

fn write_out(out: &mut dyn std::io::Write, s: &str) -> Result<()> {
    out.write_all(s.as_bytes())
        .map_err(|e| crate::Error::io("cannot write output", e))
}

/// `qemu-img map --output=json`, byte for byte, written to `out` as the extents are found.
pub fn write_map_json(img: &Image, out: &mut dyn std::io::Write) -> Result<()> {
    write_map_json_in(img, 0..u64::MAX, out)
}

/// [`write_map_json`] over the guest bytes `range` (`--start-offset`, `--max-length`).
pub fn write_map_json_in(
    img: &Image,
    range: std::ops::Range<u64>,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    write_out(out, "[")?;
    let mut s = String::new();
    let mut first = true;
    let at = range.start;
    for_each_map_extent_in(img, range, |start, e| {
        s.clear();
        if !std::mem::take(&mut first) {
            s.push_str(",\n");
        }
        let _ = write!(
            s,
            "{{ \"start\": {start}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.len, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
        write_out(out, &s)
    })?;
    if first {
        // Nothing to map (an empty disk, or a range past its end): qemu-img still prints one
        // empty entry where the range starts.
        write_out(
            out,
            &format!(
                "{{ \"start\": {at}, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}}"
            ),
        )?;
    }
    write_out(out, "]\n")
}

/// `qemu-img map --output=json`, byte for byte.
pub fn map_json(img: &Image) -> Result<String> {
    let mut v = Vec::new();
    write_map_json(img, &mut v)?;
    Ok(String::from_utf8_lossy(&v).into_owned())
}

/// C's `%#x`: no prefix for zero.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// `qemu-img map` human output (data extents with their host offset and file), written to
/// `out` as the extents are found.
pub fn write_map_human(img: &Image, names: &[String], out: &mut dyn std::io::Write) -> Result<()> {
    write_map_human_in(img, names, 0..u64::MAX, out)
}

/// [`write_map_human`] over the guest bytes `range` (`--start-offset`, `--max-length`).
pub fn write_map_human_in(
    img: &Image,
    names: &[String],
    range: std::ops::Range<u64>,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    write_out(
        out,
        &format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        ),
    )?;
    for_each_map_extent_in(img, range, |start, e| {
        // qemu-img cannot name a place in a file for these, and stops.
        if e.data && e.offset.is_none() {
            return Err(crate::Error::new(
                crate::ErrorKind::UnsupportedFeature,
                "File contains external, encrypted or compressed clusters.",
            ));
        }
        if !e.data || e.zero {
            return Ok(());
        }
        let Some(o) = e.offset else {
            return Ok(());
        };
        let file = names
            .get(e.depth as usize)
            .map(String::as_str)
            .unwrap_or("");
        write_out(
            out,
            &format!("{:<16}{:<16}{:<16}{file}\n", hex(start), hex(e.len), hex(o)),
        )
    })
}

/// `qemu-img map` human output: data extents with their host offset and file.
pub fn map_human(img: &Image, names: &[String]) -> Result<String> {
    let mut v = Vec::new();
    write_map_human(img, names, &mut v)?;
    Ok(String::from_utf8_lossy(&v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_dates_like_qemu() {
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(339_968), "332 KiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(civil(0), "1970-01-01 00:00:00");
        assert_eq!(civil(1_795_641_858), "2026-11-25 21:24:18");
    }
}
