//! tiermq's test tools, apart from the broker they test: the load generator and broker
//! benchmark (`tiermq bench`, [`bench`]) and the durability checker (`tiermq check`,
//! [`check`]). The `tiermq` binary only hands its `bench` and `check` subcommands over to
//! [`bench::main`] and [`check::main`]; the tools speak to a broker over its sockets only, so
//! they depend on the codec (`tiermq-common`) and on no tier.

pub mod bench;
pub mod check;

#[cfg(test)]
mod test_broker;

use std::time::Duration;

/// Parses `10s`, `250ms`, `2m`, `1h` or a plain number of seconds (fractions allowed): the
/// duration flags of `tiermq bench`, `tiermq check` and the other CLI tools.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown duration unit {unit:?} (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a duration: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
