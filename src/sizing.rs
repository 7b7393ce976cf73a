//! Volume sizing as CDI computes it: Kubernetes quantity strings, the filesystem overhead
//! fraction, and the usable/required space formulas (bit-exact with CDI's `GetUsableSpace`
//! and `GetRequiredSpace`, including their 1 MiB alignment and float rounding).

use crate::error::{Error, Result};

/// CDI's alignment of disk sizes: 1 MiB.
pub const ALIGN: u64 = 1 << 20;

/// CDI's default filesystem overhead.
pub const DEFAULT_OVERHEAD: f64 = 0.06;

/// Parse a Kubernetes quantity (`10Gi`, `1.5G`, `500M`, `11381663335`, `1e9`, `2.5Ki`) into
/// bytes, rounding fractional results up as `Quantity.Value()` does. Negative values are
/// refused (disk sizes).
pub fn parse_quantity(s: &str) -> Result<u64> {
    let bad = |why: &str| Error::invalid(format!("invalid quantity '{s}': {why}"));
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.starts_with('-') {
        return Err(bad("negative"));
    }
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(num_end);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(bad("no number"));
    }
    if frac.contains('.') {
        return Err(bad("two decimal points"));
    }
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err(bad("too many digits"));
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| bad("not a number"))?
    };
    // value = mantissa * 2^bin * 10^(dec - frac.len())
    let (bin, dec): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        e if e.starts_with(['e', 'E']) => {
            let x: i32 = e[1..].parse().map_err(|_| bad("bad exponent"))?;
            if !(-40..=40).contains(&x) {
                return Err(bad("exponent out of range"));
            }
            (0, x)
        }
        _ => return Err(bad("unknown suffix")),
    };
    let exp10 = dec - frac.len() as i32;
    let too_big = || bad("too large");
    let mut v = mantissa.checked_mul(1u128 << bin).ok_or_else(too_big)?;
    if exp10 >= 0 {
        v = v
            .checked_mul(10u128.checked_pow(exp10 as u32).ok_or_else(too_big)?)
            .ok_or_else(too_big)?;
    } else {
        let d = 10u128.checked_pow((-exp10) as u32).ok_or_else(too_big)?;
        v = v.div_ceil(d);
    }
    u64::try_from(v).map_err(|_| too_big())
}

/// Parse a filesystem overhead fraction as CDI's `Percent` type allows it: `0`, `1`, or `0.`
/// followed by one to three digits.
pub fn parse_overhead(s: &str) -> Result<f64> {
    let ok = s == "0"
        || s == "1"
        || s.strip_prefix("0.")
            .is_some_and(|d| (1..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(Error::invalid(format!(
            "invalid filesystem overhead '{s}' (expected 0, 1 or 0.NNN)"
        )));
    }
    s.parse()
        .map_err(|_| Error::invalid(format!("invalid filesystem overhead '{s}'")))
}

/// Space a disk of `available` bytes leaves for the image after overhead `o`:
/// `RoundDown(ceil(available / (1 + o)), 1 MiB)`.
pub fn usable_space(o: f64, available: u64) -> u64 {
    let with = (available as f64 / (1.0 + o)).ceil();
    let with = if with >= u64::MAX as f64 {
        u64::MAX
    } else {
        with as u64
    };
    with / ALIGN * ALIGN
}

/// Volume size to request for an image of `requested` bytes with overhead `o`:
/// `ceil(RoundUp(requested, 1 MiB) * (1 + o))`.
pub fn required_space(o: f64, requested: u64) -> u64 {
    let aligned = requested.div_ceil(ALIGN).saturating_mul(ALIGN);
    let with = (aligned as f64 * (1.0 + o)).ceil();
    if with >= u64::MAX as f64 {
        u64::MAX
    } else {
        with as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdi_worked_numbers() {
        let o = parse_overhead("0.06").unwrap();
        assert_eq!(required_space(o, 10 << 30), 11_381_663_335);
        assert_eq!(usable_space(o, 11_381_663_335), 10_737_418_240);
        assert_eq!(usable_space(o, 10 << 30), 10_129_244_160);
        assert_eq!(usable_space(0.0, 10 << 30), 10 << 30);
    }

    #[test]
    fn quantities() {
        for (s, v) in [
            ("10Gi", 10u64 << 30),
            ("11381663335", 11_381_663_335),
            ("1.5Gi", 3 << 29),
            ("500M", 500_000_000),
            ("1k", 1000),
            ("2Ki", 2048),
            ("1e3", 1000),
            ("1E3", 1000),
            ("1E", 1_000_000_000_000_000_000),
            ("1500m", 2),
            ("0.5", 1),
            (".5Ki", 512),
            ("1.", 1),
            ("+7", 7),
            ("0", 0),
            ("1.0000001k", 1001),
        ] {
            assert_eq!(parse_quantity(s).unwrap(), v, "{s}");
        }
        for s in [
            "",
            "-1Gi",
            "1.2.3",
            "10Gb",
            "Gi",
            "1e99",
            "99999999999Ei",
            "1 Gi",
        ] {
            assert!(parse_quantity(s).is_err(), "{s} should be refused");
        }
    }

    #[test]
    fn overhead_syntax() {
        assert_eq!(parse_overhead("0").unwrap(), 0.0);
        assert_eq!(parse_overhead("1").unwrap(), 1.0);
        assert_eq!(parse_overhead("0.055").unwrap(), 0.055);
        for s in ["0.0555", "1.0", "-0.1", "0.", ".5", "2", "abc"] {
            assert!(parse_overhead(s).is_err(), "{s}");
        }
    }

    #[test]
    fn usable_of_required_covers_the_request() {
        // A deterministic sweep standing in for a property test: sizes from bytes to PiB,
        // every overhead CDI allows in steps of 0.001.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let req = x % (1 << 50);
            let o = (x >> 50) as f64 % 1001.0 / 1000.0;
            let need = required_space(o, req);
            assert!(usable_space(o, need) >= req, "o={o} req={req} need={need}");
        }
    }
}
