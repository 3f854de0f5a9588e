//! Broker process figures from /proc: CPU time (utime + stime) and resident memory.

use std::path::Path;

/// CPU seconds (user + system) used so far by process `pid`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(ticks as f64 / hz)
}

/// utime + stime in clock ticks from the text of /proc/PID/stat. The command name (field 2)
/// is in parentheses and may itself contain spaces or parentheses, so fields are counted from
/// the last ')'.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of process `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss_kib(&status)
}

pub fn parse_vmrss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// What a process is, for reports: its first argument when that is a subcommand (`tiermq
/// frontend` → "frontend"), else its command name.
pub fn role(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    role_of_cmdline(&cmdline).unwrap_or_else(|| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| pid.to_string())
    })
}

fn role_of_cmdline(cmdline: &[u8]) -> Option<String> {
    let arg = cmdline.split(|&b| b == 0).nth(1)?;
    let arg = std::str::from_utf8(arg).ok()?;
    (!arg.is_empty() && !arg.starts_with('-')).then(|| arg.to_string())
}

/// Whether `pid` is a live process.
pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Raises this process's open-file limit to its hard limit (many connections need many fds).
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 123 456 789";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn vmrss() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t   12345 kB\nThreads: 3\n";
        assert_eq!(parse_vmrss_kib(status), Some(12345));
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
    }

    #[test]
    fn roles() {
        assert_eq!(
            role_of_cmdline(b"/bin/tiermq\0frontend\0--listen\0x\0").as_deref(),
            Some("frontend")
        );
        assert_eq!(role_of_cmdline(b"mosquitto\0-c\0f\0"), None);
        assert_eq!(role_of_cmdline(b"rumqttd\0"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(exists(me));
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
    }
}
