//! Log lines in klog's text format, as CDI's Go programs write them, so log collectors and
//! people reading `kubectl logs` see the same shape from the drop-ins:
//!
//! ```text
//! I1202 06:32:24.123456       1 importer.go:103] Import Complete
//! ```
//!
//! The severity letter (`I`, `W`, `E`, `F`), month and day, the time of day to the microsecond
//! (UTC here; klog uses local time and pods run in UTC), the process id right-aligned in seven
//! columns, the caller's `file:line`, then the message. Lines go to stderr.
//!
//! [`Logger::from_args`] reads klog's verbosity flag (`-v=N`, `--v=N`, `-v N`) and ignores the
//! other klog flags CDI's controller and images pass (`-alsologtostderr`, `-logtostderr`,
//! `-stderrthreshold=…`, `-log_dir=…`, …). [`GoFlags`] parses Go `flag`-package command lines
//! for the programs that have flags of their own and accepts the klog flags among them.
//!
//! The `file:line` is the caller's, through `#[track_caller]`: a line logged through a closure
//! names the closure's location.

use std::collections::HashMap;
use std::io::Write;
use std::panic::Location;
use std::time::{SystemTime, UNIX_EPOCH};

/// A line's severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// `I`.
    Info,
    /// `W`.
    Warning,
    /// `E`.
    Error,
    /// `F`.
    Fatal,
}

impl Severity {
    fn letter(self) -> char {
        match self {
            Severity::Info => 'I',
            Severity::Warning => 'W',
            Severity::Error => 'E',
            Severity::Fatal => 'F',
        }
    }
}

/// klog's flags that take a value (`-flag=value` or `-flag value`).
const KLOG_VALUE_FLAGS: &[&str] = &[
    "v",
    "vmodule",
    "stderrthreshold",
    "log_dir",
    "log_file",
    "log_file_max_size",
    "log_backtrace_at",
];

/// klog's boolean flags (`-flag` or `-flag=true|false`).
const KLOG_BOOL_FLAGS: &[&str] = &[
    "alsologtostderr",
    "logtostderr",
    "add_dir_header",
    "skip_headers",
    "skip_log_headers",
    "one_output",
];

/// A klog-format logger writing to stderr. Cheap to clone.
#[derive(Debug, Clone, Copy)]
pub struct Logger {
    verbosity: u32,
    pid: u32,
    clock: fn() -> SystemTime,
}

impl Default for Logger {
    fn default() -> Self {
        Logger::new(0)
    }
}

/// The value of a `-v` flag: klog's is a non-negative integer; anything else counts as 0.
fn parse_level(v: &str) -> u32 {
    v.trim().parse().unwrap_or(0)
}

impl Logger {
    /// A logger at verbosity `verbosity`, with this process's id and the system clock.
    pub fn new(verbosity: u32) -> Logger {
        Logger {
            verbosity,
            pid: std::process::id(),
            clock: SystemTime::now,
        }
    }

    /// The verbosity from klog's flags among `args` (the program name excluded): the last of
    /// `-v=N`, `--v=N`, `-v N`, `--v N`. Every other argument is ignored.
    pub fn from_args<S: AsRef<str>>(args: &[S]) -> Logger {
        let mut v = 0;
        let mut it = args.iter().map(AsRef::as_ref);
        while let Some(a) = it.next() {
            let Some(body) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
                continue;
            };
            match body.split_once('=') {
                Some(("v", val)) => v = parse_level(val),
                None if body == "v" => {
                    if let Some(val) = it.next() {
                        v = parse_level(val);
                    }
                }
                _ => {}
            }
        }
        Logger::new(v)
    }

    /// The same logger with another clock (tests).
    pub fn with_clock(mut self, clock: fn() -> SystemTime) -> Logger {
        self.clock = clock;
        self
    }

    /// The same logger printing another process id (tests).
    pub fn with_pid(mut self, pid: u32) -> Logger {
        self.pid = pid;
        self
    }

    /// The verbosity (`-v`).
    pub fn verbosity(&self) -> u32 {
        self.verbosity
    }

    /// Whether `V(level)` lines are printed.
    pub fn enabled(&self, level: u32) -> bool {
        level <= self.verbosity
    }

    /// The line (with its newline) for a message of `sev` logged at `file:line`.
    pub fn render(&self, sev: Severity, file: &str, line: u32, msg: &str) -> String {
        let t = (self.clock)()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = t.as_secs();
        let (_, month, day) = crate::civil::from_days((secs / 86_400) as i64);
        let tod = secs % 86_400;
        let base = file.rsplit(['/', '\\']).next().unwrap_or(file);
        let mut s = format!(
            "{}{:02}{:02} {:02}:{:02}:{:02}.{:06} {:7} {}:{}] {}",
            sev.letter(),
            month,
            day,
            tod / 3600,
            tod / 60 % 60,
            tod % 60,
            t.subsec_micros(),
            self.pid,
            base,
            line,
            msg
        );
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s
    }

    /// Write a line of `sev` for the caller's location.
    #[track_caller]
    pub fn log(&self, sev: Severity, msg: &str) {
        let loc = Location::caller();
        let line = self.render(sev, loc.file(), loc.line(), msg);
        // One write per line, so lines from threads do not interleave; a closed stderr is
        // not worth failing for.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    /// An `I` line.
    #[track_caller]
    pub fn info(&self, msg: &str) {
        self.log(Severity::Info, msg);
    }

    /// A `W` line.
    #[track_caller]
    pub fn warning(&self, msg: &str) {
        self.log(Severity::Warning, msg);
    }

    /// An `E` line.
    #[track_caller]
    pub fn error(&self, msg: &str) {
        self.log(Severity::Error, msg);
    }

    /// An `I` line printed only when `level` ≤ the verbosity (klog's `V(level).Info`).
    #[track_caller]
    pub fn v(&self, level: u32, msg: &str) {
        if self.enabled(level) {
            self.log(Severity::Info, msg);
        }
    }

    /// The line for a message from the library's `log` callback: `warning: …` becomes a `W`
    /// line without that prefix, anything else an `I` line.
    #[track_caller]
    pub fn relay(&self, msg: &str) {
        match msg.strip_prefix("warning:") {
            Some(w) => self.log(Severity::Warning, w.trim_start()),
            None => self.log(Severity::Info, msg),
        }
    }
}

/// A Go `flag`-package command line: `-name`, `--name`, `-name=value`, and `-name value` for
/// flags that take a value (booleans take one only as `-name=value`). Parsing stops at `--`
/// or at the first argument that is not a flag, as Go's does. klog's flags are accepted
/// alongside the program's own and `-v` sets [`GoFlags::logger`]'s verbosity.
#[derive(Debug, Clone, Default)]
pub struct GoFlags {
    values: HashMap<String, String>,
    /// The arguments after the flags.
    pub positional: Vec<String>,
}

impl GoFlags {
    /// Parse `args` (the program name excluded) for the program's `value_flags` and
    /// `bool_flags`. An unknown flag, a missing value or a malformed boolean is an error
    /// naming it, as Go reports it.
    pub fn parse<S: AsRef<str>>(
        args: &[S],
        value_flags: &[&str],
        bool_flags: &[&str],
    ) -> std::result::Result<GoFlags, String> {
        let takes_value = |n: &str| value_flags.contains(&n) || KLOG_VALUE_FLAGS.contains(&n);
        let is_bool = |n: &str| bool_flags.contains(&n) || KLOG_BOOL_FLAGS.contains(&n);
        let mut out = GoFlags::default();
        let mut i = 0;
        while i < args.len() {
            let a = args[i].as_ref();
            i += 1;
            if a == "--" {
                break;
            }
            let body = match a.strip_prefix("--").or_else(|| a.strip_prefix('-')) {
                Some(b) if !b.is_empty() && !b.starts_with('-') && !b.starts_with('=') => b,
                _ => {
                    i -= 1;
                    break;
                }
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            if is_bool(name) {
                let v = inline.unwrap_or("true");
                if super::parse_go_bool(v).is_none() {
                    return Err(format!(
                        "invalid boolean value {v:?} for -{name}: parse error"
                    ));
                }
                out.values.insert(name.to_string(), v.to_string());
            } else if takes_value(name) {
                let v = match inline {
                    Some(v) => v.to_string(),
                    None => {
                        let Some(v) = args.get(i) else {
                            return Err(format!("flag needs an argument: -{name}"));
                        };
                        i += 1;
                        v.as_ref().to_string()
                    }
                };
                out.values.insert(name.to_string(), v);
            } else {
                return Err(format!("flag provided but not defined: -{name}"));
            }
        }
        out.positional = args[i..].iter().map(|s| s.as_ref().to_string()).collect();
        Ok(out)
    }

    /// The value of flag `name` (the last one given), if it was given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// A boolean flag's value (false when absent).
    pub fn bool(&self, name: &str) -> bool {
        self.get(name)
            .and_then(super::parse_go_bool)
            .unwrap_or(false)
    }

    /// A logger at the verbosity of `-v`.
    pub fn logger(&self) -> Logger {
        Logger::new(self.get("v").map_or(0, parse_level))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fixed() -> SystemTime {
        // 2026-12-02 06:32:24.123456 UTC
        UNIX_EPOCH + Duration::from_micros(1_796_193_144_123_456)
    }

    #[test]
    fn line_format_matches_klog() {
        let l = Logger::new(0).with_clock(fixed).with_pid(1);
        assert_eq!(
            l.render(
                Severity::Info,
                "src/bin/vdisk-importer/main.rs",
                103,
                "Import Complete"
            ),
            "I1202 06:32:24.123456       1 main.rs:103] Import Complete\n"
        );
        let l = l.with_pid(1234567);
        assert_eq!(
            l.render(Severity::Error, "x.rs", 7, "boom\n"),
            "E1202 06:32:24.123456 1234567 x.rs:7] boom\n"
        );
        let l = l.with_pid(42);
        assert!(
            l.render(Severity::Warning, "a/b.rs", 1, "w")
                .starts_with("W1202 06:32:24.123456      42 b.rs:1] w")
        );
    }

    #[test]
    fn verbosity_flags() {
        assert_eq!(Logger::from_args::<&str>(&[]).verbosity(), 0);
        assert_eq!(
            Logger::from_args(&["-alsologtostderr", "-v=3"]).verbosity(),
            3
        );
        assert_eq!(Logger::from_args(&["--v=2"]).verbosity(), 2);
        assert_eq!(Logger::from_args(&["-v", "4", "serve"]).verbosity(), 4);
        assert_eq!(Logger::from_args(&["-v=x"]).verbosity(), 0);
        let l = Logger::new(1);
        assert!(l.enabled(0) && l.enabled(1) && !l.enabled(2));
    }

    #[test]
    fn go_flags() {
        let f = GoFlags::parse(
            &[
                "-image-path",
                "/data/disk.img",
                "--scheme=file://",
                "-v=2",
                "-alsologtostderr",
                "-log_dir",
                "/tmp",
            ],
            &["image-path", "scheme"],
            &[],
        )
        .unwrap();
        assert_eq!(f.get("image-path"), Some("/data/disk.img"));
        assert_eq!(f.get("scheme"), Some("file://"));
        assert!(f.bool("alsologtostderr"));
        assert_eq!(f.logger().verbosity(), 2);
        assert!(f.positional.is_empty());
        let e = GoFlags::parse(&["-nope"], &["a"], &[]).unwrap_err();
        assert!(e.contains("not defined: -nope"), "{e}");
        assert!(GoFlags::parse(&["-a"], &["a"], &[]).is_err());
        assert!(GoFlags::parse(&["-b=maybe"], &[], &["b"]).is_err());
        let f = GoFlags::parse(&["-b", "rest", "-a", "x"], &["a"], &["b"]).unwrap();
        assert!(f.bool("b") && f.get("a").is_none());
        assert_eq!(f.positional, ["rest", "-a", "x"]);
        let f = GoFlags::parse(&["--", "-a"], &["a"], &[]).unwrap();
        assert_eq!(f.positional, ["-a"]);
    }
}
