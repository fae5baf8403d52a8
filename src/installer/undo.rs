//! The undo log: what the installer changed on the host, written before each change.
//!
//! One log per node, in the state directory, shared by every installer process that owns the install
//! in turn (a newer pod inherits it during a rolling update). It is a JSON-lines file appended with
//! `O_APPEND` and synced before the change it describes, so a crash between the two leaves a record
//! of a change that may not have happened — undoing that is harmless — and never the reverse.
//! Re-injecting into the same file after the primary CNI rewrote it adds no record: the record names
//! the file and where the primary's pristine bytes are kept, and only those bytes are refreshed.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use super::atomic;
use super::conflist::{self, Shape};

/// One change to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// We placed the plugin binary at `path`; `saved` keeps what was there before, if anything was.
    Binary { path: PathBuf, saved: Option<PathBuf> },
    /// We created `path` (the plugin's kubeconfig, its token copy).
    File { path: PathBuf },
    /// We chained our entry into the list at `path`. `original` is the file the primary CNI wrote
    /// (a `.conf` we converted, or `path` itself); `pristine` keeps its bytes from before us.
    Chain { path: PathBuf, original: PathBuf, pristine: PathBuf },
    /// The change at `path` has been undone.
    Undone { path: PathBuf },
}

impl Record {
    fn path(&self) -> &Path {
        match self {
            Record::Binary { path, .. }
            | Record::File { path }
            | Record::Chain { path, .. }
            | Record::Undone { path } => path,
        }
    }

    /// Undo order: chains first (so the runtime stops calling us), then our files, the binary last.
    fn rank(&self) -> u8 {
        match self {
            Record::Chain { .. } => 0,
            Record::File { .. } => 1,
            Record::Binary { .. } => 2,
            Record::Undone { .. } => 3,
        }
    }
}

/// One failure while undoing.
#[derive(Debug, Error)]
pub enum UndoError {
    #[error("cannot read the undo log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("undo log {path} line {line} is not a record")]
    Corrupt {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the undo log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot undo {what} at {path}")]
    Revert {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Every failure of one uninstall; they are all reported, none hides another.
#[derive(Debug, Error)]
#[error("{} removal error(s): {}", .0.len(), join(.0))]
pub struct UndoErrors(pub Vec<UndoError>);

fn join(errors: &[UndoError]) -> String {
    errors.iter().map(|e| crate::text::chain(e)).collect::<Vec<_>>().join("; ")
}

/// The undo log file.
#[derive(Debug, Clone)]
pub struct UndoLog {
    path: PathBuf,
}

impl UndoLog {
    pub fn new(path: PathBuf) -> UndoLog {
        UndoLog { path }
    }

    /// Every record, in the order written.
    pub fn records(&self) -> Result<Vec<Record>, UndoError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(UndoError::Read { path: self.path.clone(), source }),
        };
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(r) => out.push(r),
                // A torn last line is what a crash mid-append leaves: the change it announced did not
                // start, so it needs no undo.
                Err(_) if i + 1 == text.lines().count() && !text.ends_with('\n') => {
                    log::warn!("{}: ignoring a torn last line", self.path.display())
                }
                Err(source) => return Err(UndoError::Corrupt { path: self.path.clone(), line: i + 1, source }),
            }
        }
        Ok(out)
    }

    /// The changes still in force: the last record per path, unless it says undone; in undo order.
    pub fn pending(&self) -> Result<Vec<Record>, UndoError> {
        let mut latest: Vec<Record> = Vec::new();
        for r in self.records()? {
            latest.retain(|x| x.path() != r.path());
            latest.push(r);
        }
        latest.retain(|r| !matches!(r, Record::Undone { .. }));
        latest.reverse();
        latest.sort_by_key(Record::rank);
        Ok(latest)
    }

    /// The change in force at `path`, if any.
    pub fn pending_at(&self, path: &Path) -> Result<Option<Record>, UndoError> {
        Ok(self.pending()?.into_iter().find(|r| r.path() == path))
    }

    /// Appends `record` and syncs it to disk, unless it is already the change in force at its path.
    pub fn record(&self, record: Record) -> Result<(), UndoError> {
        if !matches!(record, Record::Undone { .. }) && self.pending_at(record.path())?.as_ref() == Some(&record) {
            return Ok(());
        }
        let mut line = serde_json::to_string(&record).expect("records always serialise");
        line.push('\n');
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().create(true).append(true).open(&self.path)?;
            f.write_all(line.as_bytes())?;
            f.sync_all()
        };
        write().map_err(|source| UndoError::Write { path: self.path.clone(), source })
    }

    /// Removes the log (after a complete uninstall).
    pub fn discard(&self) -> io::Result<()> {
        atomic::remove(&self.path).map(|_| ())
    }
}

/// Undoes one change. A change already gone (the primary CNI replaced its file, someone removed our
/// file) is not an error.
pub fn revert(record: &Record) -> Result<(), UndoError> {
    match record {
        Record::Binary { path, saved: None } | Record::File { path } => atomic::remove(path)
            .map(|_| ())
            .map_err(|source| UndoError::Revert { what: what(record), path: path.clone(), source }),
        Record::Binary { path, saved: Some(saved) } => {
            let restore = || -> io::Result<()> {
                let bytes = fs::read(saved)?;
                atomic::write(path, &bytes, 0o755)?;
                atomic::remove(saved).map(|_| ())
            };
            restore().map_err(|source| UndoError::Revert { what: "binary", path: path.clone(), source })
        }
        Record::Chain { path, original, pristine } => unchain(path, original, pristine)
            .map_err(|source| UndoError::Revert { what: "conflist entry", path: path.clone(), source }),
        Record::Undone { .. } => Ok(()),
    }
}

fn what(record: &Record) -> &'static str {
    match record {
        Record::Binary { .. } => "binary",
        Record::File { .. } => "file",
        Record::Chain { .. } => "conflist entry",
        Record::Undone { .. } => "nothing",
    }
}

/// Takes our entry out of the list at `path`. When what remains is what the primary CNI wrote, its
/// file is restored byte for byte (a converted `.conf` comes back under its own name); when the
/// primary changed it since, only our entry is removed.
fn unchain(path: &Path, original: &Path, pristine: &Path) -> io::Result<()> {
    let Some(bytes) = atomic::read_optional(path)? else {
        log::info!("{} is gone: nothing of ours to remove", path.display());
        return discard_pristine(pristine);
    };
    let Ok(doc) = serde_json::from_slice::<Value>(&bytes) else {
        log::warn!("{} is not JSON any more (rewritten by someone else?): left as it is", path.display());
        return discard_pristine(pristine);
    };
    let Some(stripped) = conflist::strip(&doc) else {
        log::info!("{} holds no entry of ours (the primary CNI rewrote it): left as it is", path.display());
        return discard_pristine(pristine);
    };
    let mode = file_mode(path)?;
    let converted = original != path;
    let saved = atomic::read_optional(pristine)?;
    let expected = saved.as_deref().and_then(|b| {
        let shape = if converted { Shape::Single } else { Shape::List };
        let doc = conflist::parse(b, shape).ok()?;
        Some(if converted { conflist::single_to_list(&doc) } else { doc })
    });
    match (saved, expected) {
        (Some(bytes), Some(expected)) if expected == stripped => {
            atomic::write(original, &bytes, mode)?;
            if converted {
                atomic::remove(path)?;
            }
            log::info!("restored {} as the primary CNI wrote it", original.display());
        }
        _ => {
            atomic::write(path, &conflist::render(&stripped), mode)?;
            log::info!("removed our entry from {} (changed since we chained into it)", path.display());
        }
    }
    discard_pristine(pristine)
}

fn discard_pristine(pristine: &Path) -> io::Result<()> {
    atomic::remove(pristine).map(|_| ())
}

/// The permission bits of `path`, to keep them when we rewrite it.
pub fn file_mode(path: &Path) -> io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

/// Undoes every pending change, in order, reporting every failure. The records of what was undone
/// are appended; what failed stays pending for the next attempt.
pub fn undo_all(log: &UndoLog) -> Result<(), UndoErrors> {
    let pending = log.pending().map_err(|e| UndoErrors(vec![e]))?;
    let mut errors = Vec::new();
    for record in &pending {
        match revert(record) {
            Ok(()) => {
                if let Err(e) = log.record(Record::Undone { path: record.path().to_path_buf() }) {
                    errors.push(e);
                }
            }
            Err(e) => {
                log::error!("{}", crate::text::chain(&e));
                errors.push(e);
            }
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(UndoErrors(errors)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn pending_keeps_the_last_record_per_path_in_undo_order() {
        let d = TestDir::new("undo-pending");
        let log = UndoLog::new(d.join("undo.log"));
        let bin = Record::Binary { path: "/b/tproxy-cni".into(), saved: None };
        let kc = Record::File { path: "/c/kubeconfig".into() };
        let a =
            Record::Chain { path: "/c/a.conflist".into(), original: "/c/a.conflist".into(), pristine: "/s/a".into() };
        let b = Record::Chain { path: "/c/b.conflist".into(), original: "/c/b.conf".into(), pristine: "/s/b".into() };
        for r in [&bin, &kc, &a, &b, &a] {
            log.record(r.clone()).unwrap();
        }
        assert_eq!(log.records().unwrap().len(), 4, "re-recording the change in force adds nothing");
        log.record(Record::Undone { path: "/c/a.conflist".into() }).unwrap();
        assert_eq!(log.pending().unwrap(), [b, kc, bin]);
    }

    #[test]
    fn a_torn_last_line_is_ignored_but_corruption_elsewhere_is_an_error() {
        let d = TestDir::new("undo-torn");
        let p = d.join("undo.log");
        fs::write(&p, "{\"op\":\"file\",\"path\":\"/k\"}\n{\"op\":\"fi").unwrap();
        assert_eq!(UndoLog::new(p.clone()).records().unwrap(), [Record::File { path: "/k".into() }]);
        fs::write(&p, "garbage\n{\"op\":\"file\",\"path\":\"/k\"}\n").unwrap();
        assert!(matches!(UndoLog::new(p).records(), Err(UndoError::Corrupt { line: 1, .. })));
    }

    #[test]
    fn unchain_restores_pristine_bytes_or_strips_only_our_entry() {
        let d = TestDir::new("undo-unchain");
        let path = d.join("10-a.conflist");
        let pristine = d.join("pristine");
        let original = b"{ \"cniVersion\": \"1.0.0\", \"name\": \"n\",\n  \"plugins\": [ {\"type\": \"bridge\"} ] }\n";
        fs::write(&pristine, original).unwrap();
        fs::write(&path, br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"tproxy-cni"}]}"#)
            .unwrap();
        unchain(&path, &path, &pristine).unwrap();
        assert_eq!(fs::read(&path).unwrap(), original, "exact bytes come back");
        assert!(!pristine.exists());

        // The primary added a plugin after us: keep its change, drop only our entry.
        fs::write(&pristine, original).unwrap();
        fs::write(
            &path,
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"tproxy-cni"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        unchain(&path, &path, &pristine).unwrap();
        let doc: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap"}]})
        );
    }

    #[test]
    fn undo_all_reports_every_failure_and_keeps_them_pending() {
        let d = TestDir::new("undo-errors");
        let log = UndoLog::new(d.join("undo.log"));
        // Two changes whose undo fails (a directory where a file was expected), one that works.
        fs::create_dir_all(d.join("dir1/x")).unwrap();
        fs::create_dir_all(d.join("dir2/x")).unwrap();
        fs::write(d.join("ok"), b"x").unwrap();
        log.record(Record::File { path: d.join("dir1") }).unwrap();
        log.record(Record::File { path: d.join("ok") }).unwrap();
        log.record(Record::Binary { path: d.join("dir2"), saved: None }).unwrap();
        let err = undo_all(&log).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.to_string().starts_with("2 removal error(s): cannot undo file at"), "{err}");
        assert!(!d.join("ok").exists());
        let left: Vec<_> = log.pending().unwrap().iter().map(|r| r.path().to_path_buf()).collect();
        assert_eq!(left, [d.join("dir1"), d.join("dir2")]);
    }
}
