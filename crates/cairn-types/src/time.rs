//! Civil time of Unix seconds (UTC), for messages and answers; no time zones.

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01.
pub fn civil_from_days(day: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-from-civil inverse.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 1..=31 and 1..=12
    let (d, m) = (
        (doy - (153 * mp + 2) / 5 + 1) as u32,
        if mp < 10 { mp + 3 } else { mp - 9 } as u32,
    );
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_utc(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a UTC time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ)");
    let (date, clock) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let num = |p: &str, lo: u32, hi: u32| -> Result<u32, String> {
        p.parse::<u32>()
            .ok()
            .filter(|v| (lo..=hi).contains(v) && p.len() >= 2)
            .ok_or_else(bad)
    };
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, dd] = d[..] else { return Err(bad()) };
    let (y, m, dd) = (num(y, 1970, 9999)?, num(m, 1, 12)?, num(dd, 1, 31)?);
    if civil_from_days(days_from_civil(i64::from(y), m, dd)).1 != m {
        return Err(bad());
    }
    let secs = match clock {
        None => 0,
        Some(c) => {
            let c: Vec<&str> = c.split(':').collect();
            let [h, mi, se] = c[..] else {
                return Err(bad());
            };
            u64::from(num(h, 0, 23)?) * 3600
                + u64::from(num(mi, 0, 59)?) * 60
                + u64::from(num(se, 0, 59)?)
        }
    };
    let days = u64::try_from(days_from_civil(i64::from(y), m, dd)).map_err(|_| bad())?;
    Ok(days * 86_400 + secs)
}

/// Seconds of a span: `90s`, `15m`, `12h`, `30d`, `2w`, `1y` (365 days), or plain seconds.
pub fn parse_span(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a time span (e.g. 3600, 90m, 12h, 30d, 2w, 1y)");
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
pub fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let (y, m, d) = civil_from_days(days);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_212_799), "2026-12-02T11:59:59Z");
        assert_eq!(civil_from_days(31), (1970, 2, 1));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }

    #[test]
    fn parsing_round_trips() {
        for t in [0, 951_782_400, 1_796_212_799, 4_102_444_800] {
            assert_eq!(parse_utc(&rfc3339(t)).unwrap(), t);
        }
        assert_eq!(parse_utc("2026-12-02").unwrap(), 1_796_169_600);
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-12-02",
            "2026-12-02T25:00:00Z",
            "x",
            "",
        ] {
            assert!(parse_utc(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_span("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_span("3600").unwrap(), 3600);
        assert!(parse_span("3x").is_err() && parse_span("d").is_err());
    }
}
