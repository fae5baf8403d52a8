//! Telling a real uninstall from a restart, so that only an uninstall removes the chain.
//!
//! While our entry is in the runtime's configuration, a pod that starts is redirected or fails to
//! start; once it is gone, a pod starts without the redirect. So the entry must outlive the
//! installer's process — a liveness kill, a crash loop, an OOM kill, a node reboot, an upgrade —
//! and go only when the installer is uninstalled (`kubectl delete` of the DaemonSet, `helm
//! uninstall`). SIGKILL needs nothing: the process cannot remove anything. SIGTERM asks this
//! module ([`Detector::verdict`]) whether the DaemonSet that runs this pod is gone.
//!
//! **How an uninstall is told.** The pod's controller `ownerReference` names its DaemonSet and that
//! DaemonSet's UID. The DaemonSet is gone when the API server answers a GET of it with a 404
//! `Status` naming it, or it is being deleted when it carries a `deletionTimestamp` (foreground
//! deletion), or it was deleted and made again when one of that name has another UID. A rolling
//! update changes the DaemonSet's template, not its UID: that is a restart.
//!
//! **Why a watch as well.** `kubectl delete` of the DaemonSet (background cascade, the default)
//! removes it at once and the garbage collector then deletes its pods; `helm uninstall` deletes it
//! first and then, without waiting, the Role, the bindings and the ServiceAccount; `kubectl delete
//! -k` deletes the ServiceAccount first. By the time the pod's SIGTERM comes, the GET is often
//! refused (401 or 403) because the credentials went with the rest of the release. So a thread
//! ([`Detector::spawn`]) keeps a watch open on the DaemonSet from the start: a watch already open
//! keeps streaming after its credentials are revoked, and it sees the deletion within milliseconds,
//! before the pods are even told to stop. At SIGTERM the fresh GET decides when it can; when it
//! cannot, what the watch saw last decides.
//!
//! **When nothing can tell** — the API server unreachable since start, the pod not run by a
//! DaemonSet, no pod identity — the install is left in place: a node whose entry outlived its
//! installer fails pods closed (they are redirected, or they fail to start), which is the safe
//! side. `--cleanup-on-exit=true` forces removal on exit; `false` never removes.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::kube::{self, Client, PartialObjectMetadata, WatchEvent};

/// What to do with the install when the installer exits (on SIGTERM or SIGINT) while it owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CleanupOnExit {
    /// Remove it only when the DaemonSet is being uninstalled; keep it on restarts, upgrades and
    /// whenever that cannot be told.
    Auto,
    /// Always remove it (when this installer owns it).
    #[value(name = "true")]
    Always,
    /// Never remove it.
    #[value(name = "false")]
    Never,
}

impl std::fmt::Display for CleanupOnExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CleanupOnExit::Auto => "auto",
            CleanupOnExit::Always => "true",
            CleanupOnExit::Never => "false",
        })
    }
}

/// The DaemonSet that runs this pod, from the pod's controller `ownerReference`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DaemonSet {}/{}", self.namespace, self.name)
    }
}

/// What is known of a DaemonSet of the owner's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// It exists with this UID; `deleting` when it carries a `deletionTimestamp`.
    Present { uid: String, deleting: bool },
    /// The API server says it does not exist.
    Absent,
}

impl Seen {
    fn of(ds: &PartialObjectMetadata) -> Seen {
        Seen::Present {
            uid: ds.metadata.uid.clone().unwrap_or_default(),
            deleting: ds.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// The answer at exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The DaemonSet is being uninstalled: remove the install. The text says how that is known.
    Uninstall(String),
    /// A restart, an upgrade, or it cannot be told: keep the install. The text says why.
    Keep(String),
}

/// Judges what is known of the owner's name against the owner itself.
pub fn judge(owner: &Owner, seen: &Seen) -> Verdict {
    match seen {
        Seen::Present { uid, deleting: false } if *uid == owner.uid => {
            Verdict::Keep(format!("{owner} is in place (a restart or an upgrade)"))
        }
        Seen::Present { uid, deleting: true } if *uid == owner.uid => {
            Verdict::Uninstall(format!("{owner} is being deleted"))
        }
        Seen::Present { .. } => Verdict::Uninstall(format!(
            "{owner} (uid {}) was deleted: the one of that name now is another object",
            owner.uid
        )),
        Seen::Absent => Verdict::Uninstall(format!("{owner} is deleted")),
    }
}

/// What the answer to a GET of the owner says, if it says anything: an error other than the API
/// server's 404 naming the DaemonSet ([`kube::Error::NotFound`]) — the API server down, our
/// credentials revoked, a proxy's 404 ([`kube::Error::NotFoundElsewhere`]) — says nothing.
pub fn seen_from(answer: &Result<PartialObjectMetadata, kube::Error>) -> Option<Seen> {
    match answer {
        Ok(ds) => Some(Seen::of(ds)),
        Err(kube::Error::NotFound { .. }) => Some(Seen::Absent),
        Err(_) => None,
    }
}

/// The owner named by a pod: its controller, when that is a DaemonSet.
pub fn owner_of(pod: &kube::Pod) -> Option<Owner> {
    let c = pod.metadata.controller()?;
    (c.kind == "DaemonSet" && c.api_version.starts_with("apps/") && !c.uid.is_empty()).then(|| Owner {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: c.name.clone(),
        uid: c.uid.clone(),
    })
}

/// How long the server keeps one watch open; the watch is then resumed from where it was.
const WATCH_FOR: Duration = Duration::from_secs(290);
/// The first wait after a failed API call; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Warnings about the API server repeat at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the watch thread knows.
#[derive(Debug, Default)]
struct Known {
    /// The DaemonSet that runs this pod, once the pod has been read.
    owner: Option<Owner>,
    /// The latest state of a DaemonSet of the owner's name, and when it was seen.
    seen: Option<(Seen, Instant)>,
    /// The pod has no DaemonSet controller: there is nothing to watch.
    unowned: bool,
}

/// The uninstall detector: this pod's identity, an API client, and what the watch knows.
#[derive(Debug, Clone)]
pub struct Detector {
    client: Arc<Client>,
    namespace: String,
    pod: String,
    known: Arc<Mutex<Known>>,
}

impl Detector {
    /// A detector for the pod `namespace`/`pod`, using `client` (the pod's service account).
    pub fn new(client: Client, namespace: String, pod: String) -> Detector {
        Detector { client: Arc::new(client), namespace, pod, known: Arc::default() }
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the thread that reads the pod's owner and keeps a watch on it. It runs until the
    /// process exits; it never holds the lock while it waits on the network.
    pub fn spawn(&self) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("uninstall-watch".into()).spawn(move || me.run()).map(drop)
    }

    fn run(&self) {
        let mut backoff = FIRST_BACKOFF;
        let mut last_warning: Option<Instant> = None;
        let mut warn = |what: &str, e: &kube::Error| {
            if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                log::warn!(
                    "{what}: {}; trying again (until it works, a SIGTERM leaves the install in place unless a \
                     fresh look shows the DaemonSet deleted)",
                    crate::text::chain(e)
                );
                last_warning = Some(Instant::now());
            } else {
                log::debug!("{what}: {}", crate::text::chain(e));
            }
        };
        let mut owner: Option<Owner> = None;
        let mut reread_pod = true;
        let mut version: Option<String> = None;
        loop {
            if reread_pod {
                match self.client.get_pod(&self.namespace, &self.pod) {
                    Ok(pod) => match owner_of(&pod) {
                        Some(o) => {
                            if owner.as_ref() != Some(&o) {
                                log::info!("this pod belongs to {o} (uid {}): watching it to tell an uninstall", o.uid);
                            }
                            self.known().owner = Some(o.clone());
                            owner = Some(o);
                        }
                        None if owner.is_some() => {
                            log::info!("this pod has no DaemonSet controller any more (orphaned)");
                        }
                        None => {
                            log::warn!(
                                "pod {}/{} is not run by a DaemonSet: no uninstall can be told, so the install is left \
                                 in place on exit (use --cleanup-on-exit=true to remove it on exit)",
                                self.namespace,
                                self.pod
                            );
                            self.known().unowned = true;
                            return;
                        }
                    },
                    Err(e) => {
                        warn(&format!("cannot read this pod {}/{}", self.namespace, self.pod), &e);
                        sleep_backoff(&mut backoff);
                        continue;
                    }
                }
                reread_pod = false;
            }
            let Some(o) = owner.clone() else {
                reread_pod = true;
                continue;
            };
            let from = match version.take() {
                Some(v) => v,
                None => match self.client.list_daemonset(&o.namespace, &o.name) {
                    Ok((ds, v)) => {
                        let seen = ds.as_ref().map_or(Seen::Absent, Seen::of);
                        reread_pod |= self.record(&o, seen);
                        v
                    }
                    Err(e) => {
                        warn(&format!("cannot read {o}"), &e);
                        sleep_backoff(&mut backoff);
                        continue;
                    }
                },
            };
            if reread_pod {
                version = Some(from);
                continue;
            }
            let watch = match self.client.watch_daemonset(&o.namespace, &o.name, &from, WATCH_FOR) {
                Ok(w) => w,
                Err(e) if e.is_gone() => {
                    log::debug!("watch of {o} from {from} expired: listing again");
                    continue;
                }
                Err(e) => {
                    warn(&format!("cannot watch {o}"), &e);
                    sleep_backoff(&mut backoff);
                    continue;
                }
            };
            version = Some(from);
            let started = Instant::now();
            for event in watch {
                let (seen, v) = match event {
                    Ok(WatchEvent::Added(ds) | WatchEvent::Modified(ds)) => {
                        (Some(Seen::of(&ds)), ds.metadata.resource_version.clone())
                    }
                    Ok(WatchEvent::Deleted(ds)) => (Some(Seen::Absent), ds.metadata.resource_version.clone()),
                    Ok(WatchEvent::Bookmark { resource_version }) => (None, Some(resource_version)),
                    Ok(WatchEvent::Error { code, reason, message }) => {
                        log::debug!("watch of {o} ended by the server: {code:?} {reason:?} {message:?}");
                        if code == Some(410) {
                            version = None; // too old: list again
                        }
                        break;
                    }
                    Err(e) => {
                        log::debug!("watch of {o} broke off: {}", crate::text::chain(&e));
                        break;
                    }
                };
                if let Some(v) = v.filter(|v| !v.is_empty()) {
                    version = Some(v);
                }
                if let Some(seen) = seen
                    && self.record(&o, seen)
                {
                    // Another DaemonSet of that name: it may have adopted this pod.
                    reread_pod = true;
                    break;
                }
            }
            // A watch that the server or the network ends at once must not become a busy loop.
            if started.elapsed() < Duration::from_secs(5) {
                sleep_backoff(&mut backoff);
            } else {
                backoff = FIRST_BACKOFF;
            }
        }
    }

    /// Records what was seen of the owner's name; true when it is another object than the owner.
    fn record(&self, owner: &Owner, seen: Seen) -> bool {
        let other = matches!(&seen, Seen::Present { uid, .. } if *uid != owner.uid);
        let mut known = self.known();
        if known.seen.as_ref().map(|(s, _)| s) != Some(&seen) {
            match (&seen, judge(owner, &seen)) {
                (_, Verdict::Uninstall(why)) => log::info!("{why}: the install will be removed on exit"),
                (Seen::Present { .. }, Verdict::Keep(_)) => log::debug!("{owner} is in place"),
                _ => {}
            }
        }
        known.seen = Some((seen, Instant::now()));
        other
    }

    /// Decides, at exit, whether the DaemonSet is being uninstalled: a fresh GET when the API
    /// server answers it, what the watch saw last otherwise, and "keep" when nothing is known.
    pub fn verdict(&self) -> Verdict {
        let (owner, unowned) = {
            let k = self.known();
            (k.owner.clone(), k.unowned)
        };
        if unowned {
            return Verdict::Keep(format!("pod {}/{} is not run by a DaemonSet", self.namespace, self.pod));
        }
        let owner = match owner {
            Some(o) => o,
            None => match self.client.get_pod(&self.namespace, &self.pod) {
                Ok(pod) => match owner_of(&pod) {
                    Some(o) => o,
                    None => {
                        return Verdict::Keep(format!("pod {}/{} is not run by a DaemonSet", self.namespace, self.pod));
                    }
                },
                Err(e) => {
                    return Verdict::Keep(format!(
                        "cannot tell an uninstall from a restart: the DaemonSet that runs this pod is not known ({})",
                        crate::text::chain(&e)
                    ));
                }
            },
        };
        let answer = self.client.get_daemonset(&owner.namespace, &owner.name);
        let fresh = seen_from(&answer);
        let why = answer.err().map(|e| crate::text::chain(&e)).unwrap_or_default();
        let watched = self.known().seen.clone();
        let (seen, age) = match (fresh, watched) {
            (Some(seen), _) => (seen, None),
            (None, Some((seen, at))) => (seen, Some(at.elapsed())),
            (None, None) => return Verdict::Keep(format!("cannot tell an uninstall from a restart: {why}")),
        };
        // Another DaemonSet of that name may have adopted this pod (after `--cascade=orphan`): the
        // pod's controller is then that one.
        let owner = match &seen {
            Seen::Present { uid, .. } if *uid != owner.uid => match self.client.get_pod(&self.namespace, &self.pod) {
                Ok(pod) => owner_of(&pod).filter(|o| o.uid == *uid).unwrap_or(owner),
                Err(_) => owner,
            },
            _ => owner,
        };
        match (judge(&owner, &seen), age) {
            (verdict, None) => verdict,
            (Verdict::Uninstall(how), Some(age)) => {
                Verdict::Uninstall(format!("{how} (seen by the watch {} ms ago; now: {why})", age.as_millis()))
            }
            (Verdict::Keep(how), Some(age)) => Verdict::Keep(format!(
                "{how} as last seen by the watch {} s ago, and it cannot be read now ({why})",
                age.as_secs()
            )),
        }
    }
}

fn sleep_backoff(backoff: &mut Duration) {
    std::thread::sleep(*backoff);
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner { namespace: "kube-system".into(), name: "tproxy-cni".into(), uid: "u-1".into() }
    }

    fn ds(json: &str) -> PartialObjectMetadata {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn only_a_deleted_or_deleting_daemonset_is_an_uninstall() {
        let o = owner();
        let present = |uid: &str, deleting| Seen::Present { uid: uid.into(), deleting };
        assert!(matches!(judge(&o, &present("u-1", false)), Verdict::Keep(w) if w.contains("in place")));
        assert!(matches!(judge(&o, &present("u-1", true)), Verdict::Uninstall(w) if w.contains("being deleted")));
        assert!(matches!(judge(&o, &present("u-2", false)), Verdict::Uninstall(w) if w.contains("another object")));
        assert!(matches!(judge(&o, &present("u-2", true)), Verdict::Uninstall(_)));
        assert!(matches!(judge(&o, &Seen::Absent), Verdict::Uninstall(w) if w.contains("is deleted")));
    }

    #[test]
    fn a_get_answer_says_something_only_when_it_names_the_object() {
        let alive = ds(
            r#"{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{"name":"tproxy-cni","uid":"u-1","generation":7}}"#,
        );
        assert_eq!(seen_from(&Ok(alive)), Some(Seen::Present { uid: "u-1".into(), deleting: false }));
        let deleting = ds(
            r#"{"metadata":{"name":"tproxy-cni","uid":"u-1","deletionTimestamp":"2026-11-21T10:00:00Z","finalizers":["foregroundDeletion"]}}"#,
        );
        assert_eq!(seen_from(&Ok(deleting)), Some(Seen::Present { uid: "u-1".into(), deleting: true }));
        // The client returns NotFound only for the API server's Status naming the object asked for.
        let missing = kube::Error::NotFound { server: "s".into(), request: "r".into() };
        assert_eq!(seen_from(&Err(missing)), Some(Seen::Absent));
        // A 404 that names nothing (a path not served, a proxy) proves nothing; nor does a refusal.
        let elsewhere = kube::Error::NotFoundElsewhere { server: "s".into(), request: "r".into(), answer: "a".into() };
        assert_eq!(seen_from(&Err(elsewhere)), None);
        let refused = kube::Error::Forbidden { server: "s".into(), request: "r".into(), message: "m".into() };
        assert_eq!(seen_from(&Err(refused)), None);
        let gone = kube::Error::Unauthorized { server: "s".into(), request: "r".into() };
        assert_eq!(seen_from(&Err(gone)), None);
    }

    #[test]
    fn the_owner_is_the_pods_daemonset_controller() {
        let pod = |refs: &str| -> kube::Pod {
            serde_json::from_str(&format!(
                r#"{{"metadata":{{"name":"p","namespace":"kube-system","ownerReferences":{refs}}}}}"#
            ))
            .unwrap()
        };
        let o = owner_of(&pod(r#"[{"apiVersion":"v1","kind":"Node","name":"n","uid":"x"},
                {"apiVersion":"apps/v1","kind":"DaemonSet","name":"tproxy-cni","uid":"u-1","controller":true,"blockOwnerDeletion":true}]"#));
        assert_eq!(o, Some(owner()));
        // Not a controller, not a DaemonSet, no references: no owner.
        assert_eq!(owner_of(&pod(r#"[{"apiVersion":"apps/v1","kind":"DaemonSet","name":"d","uid":"u"}]"#)), None);
        assert_eq!(
            owner_of(&pod(r#"[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"r","uid":"u","controller":true}]"#)),
            None
        );
        assert_eq!(owner_of(&pod("null")), None);
    }

    #[test]
    fn the_flag_values_are_auto_true_false() {
        use clap::ValueEnum;
        let names: Vec<String> = CleanupOnExit::value_variants()
            .iter()
            .map(|v| v.to_possible_value().unwrap().get_name().to_owned())
            .collect();
        assert_eq!(names, ["auto", "true", "false"]);
        for v in CleanupOnExit::value_variants() {
            assert_eq!(CleanupOnExit::from_str(&v.to_string(), false).unwrap(), *v);
        }
    }
}
