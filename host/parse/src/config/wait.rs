//! `connect-wait`: how long a host program's `CONNECT` may wait for the guest to listen.
//!
//! Off unless set, so the daemon stays a drop-in for vhost-device-vsock (whose host program
//! sees its socket close at once when the guest refuses). The value is a whole number with a
//! unit: `ms`, `s` or `m` (`5s`, `250ms`, `1m`); `0` (or `0s`) means off.
use std::time::Duration;

/// Longest accepted wait: a waiting connection holds a handshake slot and its socket, so the
/// wait is bounded even when the user asks for more.
pub const MAX_CONNECT_WAIT: Duration = Duration::from_secs(600);

/// Parses a `connect-wait` value; `None` is off.
pub fn parse_connect_wait(value: &str) -> Result<Option<Duration>, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{value}` is not a duration (examples: 5s, 250ms, 1m)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "" if n == 0 => Duration::ZERO,
        "" => return Err(format!("`{value}` needs a unit: ms, s or m (e.g. {n}s)")),
        _ => return Err(format!("`{value}`: unknown unit `{unit}` (ms, s or m)")),
    };
    if d > MAX_CONNECT_WAIT {
        return Err(format!(
            "`{value}` is longer than the limit of {} s",
            MAX_CONNECT_WAIT.as_secs()
        ));
    }
    Ok((!d.is_zero()).then_some(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_off() {
        assert_eq!(parse_connect_wait("5s"), Ok(Some(Duration::from_secs(5))));
        assert_eq!(
            parse_connect_wait("250ms"),
            Ok(Some(Duration::from_millis(250)))
        );
        assert_eq!(parse_connect_wait("2m"), Ok(Some(Duration::from_secs(120))));
        assert_eq!(parse_connect_wait("0"), Ok(None));
        assert_eq!(parse_connect_wait("0s"), Ok(None));
    }

    #[test]
    fn bad_values_say_why() {
        for bad in [
            "",
            "s",
            "5",
            "5h",
            "-1s",
            "1.5s",
            "11m",
            "99999999999999999999s",
        ] {
            let e = parse_connect_wait(bad).expect_err(bad);
            assert!(e.contains(bad) || bad.is_empty(), "{bad}: {e}");
        }
    }
}
