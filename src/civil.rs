//! Calendar dates of Unix times in UTC, for every place that prints one (qemu-img's snapshot
//! dates, klog lines, AWS signatures, Kubernetes annotations): one conversion, no time-zone
//! database. Also `SOURCE_DATE_EPOCH`, the fixed date of reproducible outputs (ISO images,
//! containerDisks), read in one place.

/// The current Unix time in whole seconds (0 if the clock is before 1970).
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `SOURCE_DATE_EPOCH` as Unix seconds when it is set (and not blank); an error names a value
/// that is not a whole number of seconds.
pub fn source_date_epoch() -> crate::Result<Option<i64>> {
    let Some(v) = std::env::var_os("SOURCE_DATE_EPOCH") else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse::<i64>().map(Some).map_err(|_| {
        crate::Error::invalid(format!(
            "SOURCE_DATE_EPOCH '{v}' is not a whole number of seconds since 1970"
        ))
    })
}

/// (year, month 1–12, day 1–31) of the day `days` after 1970-01-01 in the proleptic
/// Gregorian calendar: counted in 400-year eras of 146 097 days starting on 1 March, so the
/// leap day falls at the end of a year.
pub fn from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // month from March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day, hour, minute, second) of `secs` seconds after the Unix epoch, UTC.
pub fn from_secs(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (y, m, d) = from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400) as u32;
    (y, m, d, tod / 3600, tod / 60 % 60, tod % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(from_days(0), (1970, 1, 1));
        assert_eq!(from_days(59), (1970, 3, 1));
        assert_eq!(from_days(19_782), (2024, 2, 29));
        assert_eq!(from_days(19_783), (2024, 3, 1));
        assert_eq!(from_days(20_818), (2026, 12, 31));
        assert_eq!(from_days(-1), (1969, 12, 31));
        assert_eq!(from_secs(1_795_641_858), (2026, 11, 25, 21, 24, 18));
        assert_eq!(from_secs(-1), (1969, 12, 31, 23, 59, 59));
    }
}
