//! Writing host files so that no reader ever sees half of one.
//!
//! Every file the installer puts on the host goes through [`write`]: the bytes land in a hidden
//! temporary file in the same directory, are flushed to disk, and replace the target with one
//! `rename(2)`. A runtime reading the CNI conf dir, or exec'ing a plugin, sees either the old file or
//! the new one. The temporary name never ends in `.conf`, `.conflist` or `.json`, so a runtime
//! scanning the directory at that instant never loads it.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The suffix of every temporary file we create; used to sweep leftovers of a crashed run.
pub const TEMP_SUFFIX: &str = ".tproxy-cni-tmp";

/// The temporary path used while replacing `target`: hidden, in the same directory (so the rename
/// stays on one filesystem), and unique to this process.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.{}{TEMP_SUFFIX}", std::process::id()))
}

/// Replaces `target` with `bytes`, atomically, with permission bits `mode`.
pub fn write(target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(target);
    let result = (|| {
        let mut f = create_temp(&tmp, mode)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        rename(&tmp, target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates (replacing a stale one) the temporary file `tmp` with permission bits `mode`.
pub fn create_temp(tmp: &Path, mode: u32) -> io::Result<File> {
    match fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let f = OpenOptions::new().write(true).create_new(true).mode(mode).open(tmp)?;
    // The umask may have narrowed `mode`: set it exactly.
    f.set_permissions(Permissions::from_mode(mode))?;
    Ok(f)
}

/// Renames `from` over `to` and makes the rename durable by syncing the directory.
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(to)
}

/// Removes `path` and syncs its directory. A file that is already gone is not an error.
pub fn remove(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Syncs the directory holding `path`, so a rename or removal in it survives a power loss.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Reads `path`, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes temporary files a crashed installer left in `dir` (only ours: they carry our suffix).
pub fn sweep_temps(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) && fs::remove_file(entry.path()).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn replaces_the_file_with_exact_mode_and_leaves_no_temporary() {
        let d = TestDir::new("atomic-replace");
        let target = d.join("10-x.conflist");
        fs::write(&target, b"old").unwrap();
        write(&target, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "a temporary file was left behind");
    }

    #[test]
    fn temporary_names_are_hidden_and_never_look_like_cni_configs() {
        let t = temp_path(Path::new("/etc/cni/net.d/10-calico.conflist"));
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".10-calico.conflist."), "{name}");
        for ext in [".conf", ".conflist", ".json"] {
            assert!(!name.ends_with(ext), "{name}");
        }
        assert_eq!(t.parent(), Some(Path::new("/etc/cni/net.d")));
    }

    #[test]
    fn sweeps_only_our_leftovers() {
        let d = TestDir::new("atomic-sweep");
        fs::write(d.join(".a.conflist.77.tproxy-cni-tmp"), b"x").unwrap();
        fs::write(d.join(".other-tmp"), b"x").unwrap();
        fs::write(d.join("10-a.conflist"), b"x").unwrap();
        assert_eq!(sweep_temps(&d).unwrap(), 1);
        let mut left: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, [".other-tmp", "10-a.conflist"]);
    }

    #[test]
    fn remove_reports_whether_anything_was_there() {
        let d = TestDir::new("atomic-remove");
        let f = d.join("k");
        fs::write(&f, b"x").unwrap();
        assert!(remove(&f).unwrap());
        assert!(!remove(&f).unwrap());
    }
}
