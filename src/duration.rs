//! Durations: one grammar for every flag, the ImageBuild spec (controller and `bob run`) and the
//! CRD's CEL rules. It is Go's `time.ParseDuration`, because that is what CEL's `duration()` runs
//! on the API server: a possibly signed sequence of decimal numbers, each with an optional
//! fraction and a unit (`ns`, `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`), such as `90s`, `1.5h`,
//! `1h30m` or `2h45m30.5s`; `0` alone is the one number without a unit. bob then wants a positive
//! length of time everywhere, so [`parse`] refuses zero and negative values, and a bare number
//! such as `30` is refused with the fix (`30s`) instead of being guessed. A leaf module: it
//! imports nothing from bob.

use std::time::Duration;

/// The grammar as a regular expression (RE2, which the API server's CEL `matches()` uses, and the
/// `regex` crate read it alike). The CRD's rules test it before calling `duration()`, whose
/// failure would otherwise reach users as a raw type conversion error. It cannot see overflow
/// (more than about 292 years), which only the parsers refuse.
pub const DURATION_RE: &str = r"^[-+]?(?:0|(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+)$";

/// The units in nanoseconds (`µs` is U+00B5 MICRO SIGN, `μs` U+03BC GREEK SMALL LETTER MU).
const UNITS: [(&str, u64); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Go's limit: durations are `i64` nanoseconds; the magnitude may reach 2^63 for negatives only.
const LIMIT: u64 = 1 << 63;

/// Why a string is not a duration bob accepts. Each message names the input and what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Nothing to read.
    #[error("empty duration: write e.g. 30s, 5m or 1h30m")]
    Empty,
    /// A number without a unit (bare numbers were once seconds for flags; no longer).
    #[error(
        "invalid duration {input:?}: the number {number} has no unit, e.g. {number}s (units: ns, us, ms, s, m, h)"
    )]
    NoUnit {
        /// The whole input.
        input: String,
        /// The number that lacks a unit.
        number: String,
    },
    /// A unit Go does not know, such as `d` or `sec`.
    #[error("invalid duration {input:?}: unknown unit {unit:?} (units: ns, us, ms, s, m, h)")]
    UnknownUnit {
        /// The whole input.
        input: String,
        /// The unit as written.
        unit: String,
    },
    /// Not a sequence of numbers with units at all.
    #[error("invalid duration {input:?}: write numbers with units, e.g. 90s, 30m or 1h30m")]
    Syntax {
        /// The whole input.
        input: String,
    },
    /// Longer than Go's `time.Duration` holds (about 292 years).
    #[error("duration {input:?} is out of range (at most 2562047h47m16.854775807s)")]
    OutOfRange {
        /// The whole input.
        input: String,
    },
    /// Zero or negative where bob needs a length of time.
    #[error("duration {input:?} must be positive")]
    NotPositive {
        /// The whole input.
        input: String,
    },
}

/// A positive duration, e.g. `1h30m`, `90s`, `300ms`: what every bob flag and spec field takes.
pub fn parse(s: &str) -> Result<Duration, Error> {
    match parse_nanos(s)? {
        n if n > 0 => Ok(Duration::from_nanos(n as u64)),
        _ => Err(Error::NotPositive { input: s.to_string() }),
    }
}

/// Exactly what Go's `time.ParseDuration` (and so CEL's `duration()`) makes of `s`, in signed
/// nanoseconds; the errors say more than Go's.
pub fn parse_nanos(s: &str) -> Result<i64, Error> {
    let input = s;
    let syntax = || Error::Syntax { input: input.to_string() };
    let range = || Error::OutOfRange { input: input.to_string() };
    if s.is_empty() {
        return Err(Error::Empty);
    }
    let (negative, mut rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    // Go's special case: a lone `0` needs no unit.
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(syntax());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let start = rest;
        if !matches!(rest.as_bytes()[0], b'.' | b'0'..=b'9') {
            return Err(syntax());
        }
        let (whole, after) = leading_int(rest).ok_or_else(range)?;
        let has_whole = after.len() != rest.len();
        rest = after;
        let (mut fraction, mut scale, mut has_fraction) = (0u64, 1f64, false);
        if let Some(after_dot) = rest.strip_prefix('.') {
            let (f, sc, after) = leading_fraction(after_dot);
            has_fraction = after.len() != after_dot.len();
            (fraction, scale, rest) = (f, sc, after);
        }
        if !has_whole && !has_fraction {
            return Err(syntax());
        }
        let number = &start[..start.len() - rest.len()];
        // The unit runs up to the next number, as in Go (so `1 h` has the unit " h").
        let unit_len = rest.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(rest.len());
        let (unit, after) = rest.split_at(unit_len);
        rest = after;
        if unit.is_empty() {
            return Err(Error::NoUnit { input: input.to_string(), number: number.to_string() });
        }
        let Some(&(_, nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(Error::UnknownUnit { input: input.to_string(), unit: unit.to_string() });
        };
        if whole > LIMIT / nanos {
            return Err(range());
        }
        let mut value = whole * nanos;
        if fraction > 0 {
            // Go's arithmetic, to the nanosecond: f64 keeps fractions of hours exact enough.
            value += (fraction as f64 * (nanos as f64 / scale)) as u64;
            if value > LIMIT {
                return Err(range());
            }
        }
        total = total.checked_add(value).filter(|t| *t <= LIMIT).ok_or_else(range)?;
    }
    match (negative, total) {
        (true, LIMIT) => Ok(i64::MIN),
        (true, t) => Ok(-(t as i64)),
        (false, LIMIT) => Err(range()),
        (false, t) => Ok(t as i64),
    }
}

/// Go's `leadingInt`: the leading digits and the rest; `None` past 2^63.
fn leading_int(s: &str) -> Option<(u64, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let mut x: u64 = 0;
    for c in s[..digits].bytes() {
        if x > LIMIT / 10 {
            return None;
        }
        x = x * 10 + u64::from(c - b'0');
        if x > LIMIT {
            return None;
        }
    }
    Some((x, &s[digits..]))
}

/// Go's `leadingFraction`: the leading digits as `x / scale` and the rest; digits past what a
/// u64 holds are read but dropped (precision, not an error).
fn leading_fraction(s: &str) -> (u64, f64, &str) {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (mut x, mut scale, mut overflow) = (0u64, 1f64, false);
    for c in s[..digits].bytes() {
        if overflow {
            continue;
        }
        if x > (LIMIT - 1) / 10 {
            overflow = true;
            continue;
        }
        let y = x * 10 + u64::from(c - b'0');
        if y > LIMIT {
            overflow = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[digits..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_has_its_exact_value() {
        let ns = |n: u64| Duration::from_nanos(n);
        let cases = [
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("90s", Duration::from_secs(90)),
            ("300ms", Duration::from_millis(300)),
            ("2h45m30.5s", Duration::from_millis(9_930_500)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("10μs", Duration::from_micros(10)),
            ("5ns", ns(5)),
            ("+5s", Duration::from_secs(5)),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("1.0000000001s", Duration::from_secs(1)),
            ("0.1s", Duration::from_millis(100)),
            ("1h1h", Duration::from_secs(7200)),
            ("1s1h", Duration::from_secs(3601)),
            ("0h5s", Duration::from_secs(5)),
            ("9223372036854775807ns", ns(i64::MAX as u64)),
            ("2562047h47m16.854775807s", ns(i64::MAX as u64)),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn go_reads_signs_and_zero_as_durations_but_bob_wants_them_positive() {
        assert_eq!(parse_nanos("0"), Ok(0));
        assert_eq!(parse_nanos("-0"), Ok(0));
        assert_eq!(parse_nanos("+0"), Ok(0));
        assert_eq!(parse_nanos("-5s"), Ok(-5_000_000_000));
        assert_eq!(parse_nanos("-9223372036854775808ns"), Ok(i64::MIN));
        for text in ["0", "-0", "0s", "0.0h", "-5s", "-1h30m", "0.0000000001s"] {
            assert_eq!(
                parse(text).unwrap_err().to_string(),
                format!("duration {text:?} must be positive"),
                "{text}"
            );
        }
    }

    #[test]
    fn each_refusal_names_the_input_and_the_fix() {
        let cases = [
            ("", "empty duration: write e.g. 30s, 5m or 1h30m"),
            (
                "30",
                r#"invalid duration "30": the number 30 has no unit, e.g. 30s (units: ns, us, ms, s, m, h)"#,
            ),
            (
                "1h30",
                r#"invalid duration "1h30": the number 30 has no unit, e.g. 30s (units: ns, us, ms, s, m, h)"#,
            ),
            (
                "1.5",
                r#"invalid duration "1.5": the number 1.5 has no unit, e.g. 1.5s (units: ns, us, ms, s, m, h)"#,
            ),
            ("3d", r#"invalid duration "3d": unknown unit "d" (units: ns, us, ms, s, m, h)"#),
            ("3 days", r#"invalid duration "3 days": unknown unit " days" (units: ns, us, ms, s, m, h)"#),
            ("1H", r#"invalid duration "1H": unknown unit "H" (units: ns, us, ms, s, m, h)"#),
            ("1h 30m", r#"invalid duration "1h 30m": unknown unit "h " (units: ns, us, ms, s, m, h)"#),
            ("soon", r#"invalid duration "soon": write numbers with units, e.g. 90s, 30m or 1h30m"#),
            (" 30s", r#"invalid duration " 30s": write numbers with units, e.g. 90s, 30m or 1h30m"#),
            (".s", r#"invalid duration ".s": write numbers with units, e.g. 90s, 30m or 1h30m"#),
            ("-", r#"invalid duration "-": write numbers with units, e.g. 90s, 30m or 1h30m"#),
            ("+-5s", r#"invalid duration "+-5s": write numbers with units, e.g. 90s, 30m or 1h30m"#),
            ("1e3s", r#"invalid duration "1e3s": unknown unit "e" (units: ns, us, ms, s, m, h)"#),
            (
                "9223372036854775808ns",
                r#"duration "9223372036854775808ns" is out of range (at most 2562047h47m16.854775807s)"#,
            ),
            ("2562048h", r#"duration "2562048h" is out of range (at most 2562047h47m16.854775807s)"#),
            (
                "99999999999999999999s",
                r#"duration "99999999999999999999s" is out of range (at most 2562047h47m16.854775807s)"#,
            ),
            (
                "2562047h2562047h",
                r#"duration "2562047h2562047h" is out of range (at most 2562047h47m16.854775807s)"#,
            ),
        ];
        for (text, message) in cases {
            assert_eq!(parse(text).unwrap_err().to_string(), message, "{text:?}");
        }
    }
}
