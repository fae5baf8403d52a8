//! Removing the node's start-up taint once the plugin is in place.
//!
//! A node registered with `--register-with-taints=tproxy-cni.io/not-ready=:NoSchedule` accepts no
//! ordinary pod until the installer has the binary, the conflist entry and the kubeconfig in place
//! and removes the taint: a mesh pod can then never start on a node where it would not be redirected.
//! The installer tolerates the taint itself.
//!
//! The API call goes through [`NodeApi`], which [`crate::kube::Client`] implements (it reads the
//! node and removes exactly the taints with our key under optimistic concurrency). What is decided here is
//! *when*: only once ready, only by the owner of the node's install, and — when the API server is
//! unreachable or refuses — again later with a growing delay, never blocking the watch loop for long.

use std::time::{Duration, Instant};

use thiserror::Error;

/// The start-up taint's default key.
pub const DEFAULT_KEY: &str = "tproxy-cni.io/not-ready";

/// The first delay after a failed attempt; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The one call the installer needs from the API server.
pub trait NodeApi {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Removes every taint with `key` from `node`, leaving the node's other taints alone. `Ok(true)`
    /// when a taint was removed, `Ok(false)` when the node had none.
    fn remove_node_taint(&self, node: &str, key: &str) -> Result<bool, Self::Error>;
}

/// The Kubernetes client reads the node and removes the taint with a JSON patch that first tests
/// each taint it removes, re-reading the node when another writer got there first.
impl NodeApi for crate::kube::Client {
    type Error = crate::kube::Error;

    fn remove_node_taint(&self, node: &str, key: &str) -> Result<bool, Self::Error> {
        crate::kube::Client::remove_node_taint(self, node, key)
    }
}

/// Where the start-up taint's removal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// No start-up taint is configured.
    NotConfigured,
    /// Not removed yet: the next attempt is due at `next`; a failure waits `backoff` before the one
    /// after.
    Pending { next: Instant, backoff: Duration },
    /// Removed, or the node never had it.
    Done,
}

impl Progress {
    /// The state before the first attempt, which is due at once.
    pub fn start(configured: bool, now: Instant) -> Progress {
        if configured { Progress::Pending { next: now, backoff: FIRST_BACKOFF } } else { Progress::NotConfigured }
    }

    /// How long until the next attempt is due, if one is pending.
    pub fn due_in(&self, now: Instant) -> Option<Duration> {
        match self {
            Progress::Pending { next, .. } => Some(next.saturating_duration_since(now)),
            _ => None,
        }
    }
}

/// One attempt, if one is due: the new progress.
pub fn step<A: NodeApi>(progress: Progress, now: Instant, api: &A, node: &str, key: &str) -> Progress {
    let Progress::Pending { next, backoff } = progress else { return progress };
    if now < next {
        return progress;
    }
    match api.remove_node_taint(node, key) {
        Ok(true) => {
            log::info!("removed the start-up taint {key} from node {node}: pods can be scheduled here now");
            Progress::Done
        }
        Ok(false) => {
            log::info!("node {node} has no start-up taint {key}");
            Progress::Done
        }
        Err(e) => {
            log::warn!(
                "cannot remove the start-up taint {key} from node {node}: {}; retrying in {}s",
                crate::text::chain(&e),
                backoff.as_secs()
            );
            Progress::Pending { next: now + backoff, backoff: (backoff * 2).min(MAX_BACKOFF) }
        }
    }
}

/// A taint key the API server would refuse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("taint key {key:?} is not a qualified name (e.g. {DEFAULT_KEY})")]
pub struct InvalidTaintKey {
    pub key: String,
}

/// Checks a taint key as the API server would (a qualified name: optional DNS prefix, `/`, name).
pub fn validate_key(key: &str) -> Result<(), InvalidTaintKey> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok { Ok(()) } else { Err(InvalidTaintKey { key: key.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, thiserror::Error)]
    #[error("API server unavailable")]
    struct Unavailable;

    /// An API server that fails a number of times, then holds a node with or without the taint.
    struct FakeApi {
        failures: RefCell<usize>,
        tainted: RefCell<bool>,
        calls: RefCell<Vec<(String, String)>>,
    }

    impl NodeApi for FakeApi {
        type Error = Unavailable;
        fn remove_node_taint(&self, node: &str, key: &str) -> Result<bool, Unavailable> {
            self.calls.borrow_mut().push((node.into(), key.into()));
            if *self.failures.borrow() > 0 {
                *self.failures.borrow_mut() -= 1;
                return Err(Unavailable);
            }
            Ok(self.tainted.replace(false))
        }
    }

    fn api(failures: usize, tainted: bool) -> FakeApi {
        FakeApi { failures: RefCell::new(failures), tainted: RefCell::new(tainted), calls: RefCell::new(Vec::new()) }
    }

    #[test]
    fn removes_once_and_is_done() {
        let t0 = Instant::now();
        let a = api(0, true);
        let p = step(Progress::start(true, t0), t0, &a, "n1", DEFAULT_KEY);
        assert_eq!(p, Progress::Done);
        assert_eq!(step(p, t0, &a, "n1", DEFAULT_KEY), Progress::Done);
        assert_eq!(*a.calls.borrow(), [("n1".to_owned(), DEFAULT_KEY.to_owned())], "no call once done");
        // A node registered without the taint: nothing to remove, done as well.
        assert_eq!(step(Progress::start(true, t0), t0, &api(0, false), "n1", DEFAULT_KEY), Progress::Done);
    }

    #[test]
    fn failures_back_off_exponentially_up_to_a_minute_and_wait_their_turn() {
        let t0 = Instant::now();
        let a = api(10, true);
        let mut p = Progress::start(true, t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            p = step(p, now, &a, "n1", DEFAULT_KEY);
            let wait = p.due_in(now).unwrap();
            // Not due yet: no call.
            let calls = a.calls.borrow().len();
            assert_eq!(step(p, now + wait / 2, &a, "n1", DEFAULT_KEY), p);
            assert_eq!(a.calls.borrow().len(), calls);
            waits.push(wait.as_secs());
            now += wait;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        // The API server comes back: the next due attempt removes the taint.
        *a.failures.borrow_mut() = 0;
        assert_eq!(step(p, now, &a, "n1", DEFAULT_KEY), Progress::Done);
    }

    #[test]
    fn nothing_happens_when_not_configured() {
        let t0 = Instant::now();
        let a = api(0, true);
        assert_eq!(step(Progress::start(false, t0), t0, &a, "n1", DEFAULT_KEY), Progress::NotConfigured);
        assert!(a.calls.borrow().is_empty());
    }

    #[test]
    fn keys_are_qualified_names() {
        assert!(validate_key(DEFAULT_KEY).is_ok());
        assert!(validate_key("not-ready").is_ok());
        for bad in ["", "Bad_Prefix/x", "a/", "/x", "x y", "tproxy-cni.io/-x"] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }
}
