//! Placing the plugin binary in the host's CNI bin dir.
//!
//! The copy is written under a hidden temporary name, synced, read back and checked against the
//! source's SHA-256, and only then renamed over the target. A runtime exec'ing the plugin at that
//! moment runs either the old file or the new one, complete; we never open a file that may be
//! executing for writing, so there is no "text file busy". A file already in place with the right
//! checksum is left alone, so restarts do not rewrite it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use thiserror::Error;

use super::atomic;

/// A SHA-256 digest.
pub type Checksum = [u8; 32];

#[derive(Debug, Error)]
pub enum BinaryError {
    #[error("cannot read the plugin binary {path}")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the copy at {path} does not match the source after writing (checksum {found}, expected {expected}): disk or filesystem trouble"
    )]
    Mismatch { path: PathBuf, found: String, expected: String },
}

/// The binary to install: where it is and what it must hash to.
#[derive(Debug)]
pub struct Plugin {
    pub source: PathBuf,
    pub checksum: Checksum,
    /// The identity (device, inode, size, mtime) of the last target file verified to match.
    verified: Mutex<Option<FileId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(m: &fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

impl Plugin {
    /// Hashes the source binary once.
    pub fn load(source: &Path) -> Result<Plugin, BinaryError> {
        let checksum = hash_file(source).map_err(|e| BinaryError::Source { path: source.to_path_buf(), source: e })?;
        Ok(Plugin { source: source.to_path_buf(), checksum, verified: Mutex::new(None) })
    }

    /// Is `target` our binary? Rehashes only when the file changed since it was last verified.
    pub fn in_place(&self, target: &Path) -> io::Result<bool> {
        let m = match fs::metadata(target) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let id = FileId::of(&m);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if *verified == Some(id) {
            return Ok(true);
        }
        let ok = m.mode() & 0o111 != 0 && hash_file(target)? == self.checksum;
        *verified = ok.then_some(id);
        Ok(ok)
    }

    /// Puts the binary at `target` unless it is already there. Returns whether it wrote.
    pub fn install(&self, target: &Path) -> Result<bool, BinaryError> {
        let werr = |e: io::Error| BinaryError::Write { path: target.to_path_buf(), source: e };
        if self.in_place(target).map_err(werr)? {
            return Ok(false);
        }
        let tmp = atomic::temp_path(target);
        let result = self.copy_verified(&tmp).and_then(|()| atomic::rename(&tmp, target).map_err(werr));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        self.in_place(target).map_err(werr)?;
        Ok(true)
    }

    fn copy_verified(&self, tmp: &Path) -> Result<(), BinaryError> {
        let werr = |e: io::Error| BinaryError::Write { path: tmp.to_path_buf(), source: e };
        let mut src =
            File::open(&self.source).map_err(|e| BinaryError::Source { path: self.source.clone(), source: e })?;
        let mut dst = atomic::create_temp(tmp, 0o755).map_err(werr)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BinaryError::Source { path: self.source.clone(), source: e }),
            };
            dst.write_all(&buf[..n]).map_err(werr)?;
        }
        dst.sync_all().map_err(werr)?;
        drop(dst);
        let found = hash_file(tmp).map_err(werr)?;
        if found != self.checksum {
            return Err(BinaryError::Mismatch {
                path: tmp.to_path_buf(),
                found: hex(&found),
                expected: hex(&self.checksum),
            });
        }
        Ok(())
    }
}

/// SHA-256 of a file, streamed.
pub fn hash_file(path: &Path) -> io::Result<Checksum> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(h.finalize().into())
}

/// Lower-case hex of a checksum.
pub fn hex(sum: &Checksum) -> String {
    sum.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn installs_verifies_and_skips_an_identical_copy() {
        let d = TestDir::new("binary");
        fs::create_dir_all(d.join("bin")).unwrap();
        let src = d.join("src");
        fs::write(&src, vec![7u8; 200_000]).unwrap();
        let plugin = Plugin::load(&src).unwrap();
        let target = d.join("bin/tproxy-cni");
        assert!(plugin.install(&target).unwrap());
        assert_eq!(fs::read(&target).unwrap(), fs::read(&src).unwrap());
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(!plugin.install(&target).unwrap(), "an identical copy is not rewritten");
        // Someone overwrote it: the next install puts ours back.
        fs::write(&target, b"other").unwrap();
        assert!(!plugin.in_place(&target).unwrap());
        assert!(plugin.install(&target).unwrap());
        assert_eq!(fs::read_dir(d.join("bin")).unwrap().count(), 1, "no temporary left");
    }

    #[test]
    fn checksum_is_sha256() {
        let d = TestDir::new("sha");
        let f = d.join("abc");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(hex(&hash_file(&f).unwrap()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
