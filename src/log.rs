//! The plugin's logger: stderr, plus the conflist's `log_file` when set.
//!
//! Every line carries the pod and container it is about, so one node's log file can be read for one
//! pod. A plugin lives for milliseconds: the logger is a plain `log` backend with no threads and no
//! buffering beyond the line being written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    state: Mutex<State>,
}

struct State {
    level: LevelFilter,
    file: Option<File>,
    context: String,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn logger() -> &'static Logger {
    LOGGER.get_or_init(|| Logger {
        state: Mutex::new(State { level: LevelFilter::Warn, file: None, context: String::new() }),
    })
}

/// Installs the logger at `level` on stderr. Safe to call more than once.
pub fn init(level: LevelFilter) {
    let l = logger();
    let _ = log::set_logger(l);
    l.state.lock().unwrap_or_else(|e| e.into_inner()).level = level;
    log::set_max_level(level);
}

/// Applies the conflist's settings. A log file that cannot be opened is reported and skipped:
/// logging must never be the reason a pod fails to start.
pub fn configure(level: LevelFilter, file: Option<&Path>) {
    init(level);
    let Some(path) = file else { return };
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => logger().state.lock().unwrap_or_else(|e| e.into_inner()).file = Some(f),
        Err(e) => log::warn!("cannot open log_file {}: {e}", path.display()),
    }
}

/// Sets the `container=… pod=…` prefix of every following line.
pub fn set_context(context: String) {
    logger().state.lock().unwrap_or_else(|e| e.into_inner()).context = context;
}

/// Only our own crate's records are written. The HTTP and TLS libraries log at debug level what
/// they send and receive, and that must never reach a node's log file (it could carry credentials).
fn ours(metadata: &Metadata) -> bool {
    let target = metadata.target();
    target == OUR_TARGET || target.strip_prefix(OUR_TARGET).is_some_and(|rest| rest.starts_with("::"))
}

const OUR_TARGET: &str = "tproxy_cni";

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        ours(metadata) && metadata.level() <= self.state.lock().unwrap_or_else(|e| e.into_inner()).level
    }

    fn log(&self, record: &Record) {
        if !ours(record.metadata()) {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if record.level() > st.level {
            return;
        }
        let sep = if st.context.is_empty() { "" } else { " " };
        let line = format!(
            "{} {:<5} tproxy-cni{sep}{}: {}\n",
            timestamp(),
            record.level(),
            escape_controls(&st.context),
            escape_controls(&record.args().to_string())
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some(f) = st.file.as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Writes control characters (line breaks among them) as escapes, so text that came from a pod's
/// annotations or the runtime can never start a log line of its own.
fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// RFC 3339 UTC time with milliseconds, without a date-time dependency.
fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, now.subsec_millis())
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_records_are_written() {
        let md = |target| Metadata::builder().target(target).level(log::Level::Error).build();
        assert!(ours(&md("tproxy_cni")) && ours(&md("tproxy_cni::kube::client")));
        assert!(!ours(&md("ureq::unversioned::transport")) && !ours(&md("rustls::client")));
        assert!(!ours(&md("tproxy_cni_other")));
    }

    #[test]
    fn annotation_text_cannot_forge_a_log_line() {
        assert_eq!(
            escape_controls("a\nERROR tproxy-cni: forged\r\u{1b}[2J"),
            "a\\nERROR tproxy-cni: forged\\r\\u{1b}[2J"
        );
        assert!(matches!(escape_controls("plain ünïcode"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn dates_are_right_across_leap_years() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_778), (2026, 11, 21));
    }
}
