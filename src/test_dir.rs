//! Scratch directories for the unit tests: each is removed when its guard is dropped, so a test
//! that fails half way leaves nothing in the temporary directory either.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh, empty directory under the system's temporary directory, removed on drop.
pub(crate) struct TestDir(PathBuf);

impl TestDir {
    /// A new directory whose name carries `tag`, unique in this process and across processes.
    pub(crate) fn new(tag: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tproxy-cni-{tag}-{}-{n}", std::process::id()));
        // A directory of that name can only be left from a process with our PID that was killed.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestDir(path)
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
