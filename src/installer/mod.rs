//! The installer: `tproxy-cni install`, one long-running process per node (a DaemonSet pod).
//!
//! It puts the plugin binary in the host's CNI bin dir, writes the plugin's kubeconfig and token
//! copy, chains our entry into the network configuration the runtime uses, and keeps all of it in
//! place: a directory watch (with a periodic resync as a safety net) re-injects the entry when the
//! primary CNI rewrites its file, and the token copy follows kubelet's token rotation. Restarts,
//! crashes and upgrades leave all of it in place, so pods that start meanwhile are still redirected
//! (or fail); only an uninstall — the DaemonSet deleted, told apart by [`uninstall`] — makes it
//! remove exactly what it installed, from its undo log, and only if no newer installer on the same
//! node has taken over (see [`owner`]). Readiness is served on `/readyz` and as a file.
//!
//! Everything is synchronous: one thread waits on inotify and a signalfd, one serves probes, and
//! one keeps a watch on the installer's DaemonSet.

pub mod atomic;
pub mod binary;
pub mod cli;
pub mod conflist;
pub mod kubeconfig;
pub mod owner;
pub mod ready;
pub mod taint;
pub mod undo;
pub mod uninstall;
pub mod watch;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use thiserror::Error;

use self::binary::{BinaryError, Plugin};
use self::conflist::{ChainError, Scan, Shape};
use self::kubeconfig::{Credentials, CredentialsError};
use self::owner::{Decision, Identity, InstallState, LifeLock, Marker, StateDir};
use self::ready::{Heartbeat, NotReady, ReadyFile};
use self::taint::NodeApi;
use self::undo::{Record, UndoError, UndoErrors, UndoLog};
use self::uninstall::{CleanupOnExit, Detector, Verdict};
use self::watch::Watcher;
use crate::plugin::config::POD_ANNOTATIONS_CAPABILITY;

/// Keys of our conflist entry that the installer sets itself; plugin settings cannot override them.
pub const RESERVED_KEYS: [&str; 7] =
    ["type", "name", "cniVersion", "capabilities", "kubeconfig", "prevResult", "runtimeConfig"];

/// How often the log says we are still waiting for the primary CNI's configuration.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(5);
/// How soon to look again at a configuration file that is being written.
const SETTLE_RETRY: Duration = Duration::from_millis(200);
/// Removals of our entry within [`FLAP_WINDOW`] that mean the primary CNI is fighting us.
const FLAP_COUNT: usize = 5;
const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// While fighting, re-inject no more often than this, so two daemons do not spin the CPU.
const FLAP_MIN_INTERVAL: Duration = Duration::from_millis(250);

/// The installer's settings, validated by the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The host's CNI binary directory (mounted into the pod).
    pub cni_bin_dir: PathBuf,
    /// The host's CNI configuration directory (mounted into the pod).
    pub cni_conf_dir: PathBuf,
    /// Where the node's undo log, ownership marker and pristine copies live (a hostPath).
    pub state_dir: PathBuf,
    /// The plugin binary to install (normally this very executable).
    pub source_binary: PathBuf,
    /// Plugin settings passed through into our conflist entry, as given.
    pub plugin_settings: Map<String, Value>,
    /// The kubeconfig path written into our entry, as the plugin sees it on the host; the token
    /// copy's host path is its sibling. Defaults to the kubeconfig's place in `cni_conf_dir`, which is
    /// right when the pod mounts the host's conf dir at the same path.
    pub host_kubeconfig: Option<PathBuf>,
    /// The API server URL as reachable from the host network namespace.
    pub api_server: String,
    /// The projected service-account volume.
    pub service_account_dir: PathBuf,
    /// The pod's UID (part of the instance id in the ownership marker).
    pub pod_uid: Option<String>,
    /// The pod's `namespace/name`, for the marker and log lines; empty outside Kubernetes.
    pub pod: String,
    /// The DaemonSet's `pod-template-generation`: the higher one owns the node's install.
    pub generation: u64,
    /// This node's name (for the start-up taint).
    pub node_name: Option<String>,
    /// The start-up taint key to remove once ready.
    pub startup_taint: Option<String>,
    /// Where to answer `/readyz` and `/livez`.
    pub probe_addr: Option<SocketAddr>,
    /// A file present exactly while ready.
    pub ready_file: Option<PathBuf>,
    /// The periodic resync interval (the safety net under the directory watch).
    pub resync: Duration,
    /// Whether to remove the install on exit (when we still own it): only on an uninstall, always,
    /// or never.
    pub cleanup_on_exit: CleanupOnExit,
}

/// Why the installer cannot install, or could not finish removing what it installed.
#[derive(Debug, Error)]
pub enum InstallError {
    #[error(
        "plugin setting {0:?} is set by the installer and cannot be given (remove it from the plugin configuration)"
    )]
    ReservedSetting(&'static str),
    #[error("plugin configuration rejected by the plugin")]
    RejectedSettings(#[source] crate::plugin::config::ConfigError),
    #[error("--startup-taint needs --node-name (NODE_NAME from the downward API)")]
    TaintWithoutNode,
    #[error("--startup-taint needs an API client")]
    TaintWithoutClient,
    #[error("{what} {path} does not exist or is not a directory: {hint}")]
    MissingDir { what: &'static str, path: PathBuf, hint: &'static str },
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error("cannot use the state directory {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen for probes on {addr}")]
    Probe {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch {path} or receive signals")]
    Watch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the CNI conf dir {path}")]
    ConfDir {
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
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Undo(#[from] UndoError),
    #[error("uninstall incomplete (the undo log keeps what is left for the next run)")]
    Uninstall(#[source] UndoErrors),
}

/// Builds our conflist entry from the plugin settings, and checks that the plugin accepts it.
pub fn plugin_entry(settings: &Map<String, Value>, kubeconfig: &Path) -> Result<Value, InstallError> {
    if let Some(k) = RESERVED_KEYS.iter().find(|k| settings.contains_key(**k)) {
        return Err(InstallError::ReservedSetting(k));
    }
    let mut entry = Map::new();
    entry.insert("type".into(), conflist::PLUGIN_TYPE.into());
    entry.insert("name".into(), conflist::PLUGIN_TYPE.into());
    entry.insert("capabilities".into(), serde_json::json!({ POD_ANNOTATIONS_CAPABILITY: true }));
    entry.insert("kubeconfig".into(), Value::String(kubeconfig.to_string_lossy().into_owned()));
    entry.insert("log_level".into(), "info".into());
    for (k, v) in settings {
        entry.insert(k.clone(), v.clone());
    }
    // The plugin's own parser is the judge of what it accepts.
    let mut probe = entry.clone();
    probe.insert("cniVersion".into(), "1.0.0".into());
    crate::plugin::config::NetConf::parse(Value::Object(probe).to_string().as_bytes())
        .map_err(InstallError::RejectedSettings)?;
    Ok(Value::Object(entry))
}

/// What the conf dir looked like after a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chain {
    /// Our entry is in the file the runtime uses.
    InPlace(PathBuf),
    /// There is no network configuration yet.
    NoPrimary,
    /// A file is being written; look again in a moment.
    Unsettled,
    /// We are fighting the primary CNI; try again after this long.
    Throttled(Duration),
}

/// The paths the installer writes, derived from the settings.
#[derive(Debug, Clone)]
struct Layout {
    binary: PathBuf,
    conf_dir: PathBuf,
    bin_dir: PathBuf,
}

struct Installer<A> {
    settings: Settings,
    layout: Layout,
    plugin: Arc<Plugin>,
    entry: Arc<Value>,
    creds: Arc<Credentials>,
    state: StateDir,
    undo: UndoLog,
    me: Identity,
    owner: bool,
    swept: bool,
    flaps: VecDeque<Instant>,
    removal_noted: bool,
    last_flap_warning: Option<Instant>,
    last_injection: Option<Instant>,
    waiting_since: Option<Instant>,
    last_wait_log: Option<Instant>,
    node_api: Option<A>,
    taint: taint::Progress,
}

/// Runs the installer until SIGTERM or SIGINT. `node_api` removes the start-up taint when the settings
/// name one; `detector` tells an uninstall from a restart when cleanup on exit is `auto`.
pub fn run<A: NodeApi>(
    settings: Settings,
    node_api: Option<A>,
    detector: Option<Detector>,
) -> Result<(), InstallError> {
    // Everything that can be refused is checked before anything on the host changes.
    let layout = Layout {
        binary: settings.cni_bin_dir.join(conflist::PLUGIN_TYPE),
        conf_dir: settings.cni_conf_dir.clone(),
        bin_dir: settings.cni_bin_dir.clone(),
    };
    require_dir(
        "CNI bin dir",
        &settings.cni_bin_dir,
        "set --cni-bin-dir to the directory the runtime loads plugins from (GKE: /home/kubernetes/bin)",
    )?;
    require_dir(
        "CNI conf dir",
        &settings.cni_conf_dir,
        "set --cni-conf-dir to the runtime's network configuration directory",
    )?;
    let kubeconfig = settings.cni_conf_dir.join(kubeconfig::KUBECONFIG_NAME);
    let host_kubeconfig = settings.host_kubeconfig.clone().unwrap_or_else(|| kubeconfig.clone());
    let entry = Arc::new(plugin_entry(&settings.plugin_settings, &host_kubeconfig)?);
    if settings.startup_taint.is_some() && settings.node_name.is_none() {
        return Err(InstallError::TaintWithoutNode);
    }
    if settings.startup_taint.is_some() && node_api.is_none() {
        return Err(InstallError::TaintWithoutClient);
    }
    let plugin = Arc::new(Plugin::load(&settings.source_binary)?);
    let creds = Arc::new(Credentials {
        server: settings.api_server.clone(),
        service_account_dir: settings.service_account_dir.clone(),
        kubeconfig,
        token: settings.cni_conf_dir.join(kubeconfig::TOKEN_NAME),
        host_token: host_kubeconfig.with_file_name(kubeconfig::TOKEN_NAME),
    });

    watch::block_termination_signals().map_err(|e| InstallError::Watch { path: layout.conf_dir.clone(), source: e })?;
    let serr = |e| InstallError::State { path: settings.state_dir.clone(), source: e };
    let state = StateDir::open(&settings.state_dir).map_err(serr)?;
    let mut watcher = Watcher::new(&layout.conf_dir, &[&settings.service_account_dir, state.root()])
        .map_err(|e| InstallError::Watch { path: layout.conf_dir.clone(), source: e })?;
    let listener = match settings.probe_addr {
        Some(addr) => ready::bind(addr).map_err(|e| InstallError::Probe { addr, source: e })?,
        None => None,
    };
    let me = Identity::new(settings.pod_uid.as_deref(), settings.pod.clone(), settings.generation).map_err(serr)?;
    let life: LifeLock = state.life_lock(&me).map_err(serr)?;
    log::info!(
        "installer {} (pod {}, generation {}): bin dir {}, conf dir {}, state dir {}, binary sha256 {}",
        me.instance,
        if me.pod.is_empty() { "-" } else { &me.pod },
        me.generation,
        layout.bin_dir.display(),
        layout.conf_dir.display(),
        state.root().display(),
        binary::hex(&plugin.checksum)
    );

    let detector = match (settings.cleanup_on_exit, detector) {
        (CleanupOnExit::Auto, Some(d)) => {
            d.spawn().map_err(|e| InstallError::Watch { path: layout.conf_dir.clone(), source: e })?;
            Some(d)
        }
        (CleanupOnExit::Auto, None) => {
            log::warn!(
                "--cleanup-on-exit=auto without the pod's name and namespace (POD_NAME, POD_NAMESPACE) cannot tell an \
                 uninstall from a restart: the install will be left in place on exit"
            );
            None
        }
        _ => None,
    };

    let heartbeat = Arc::new(Heartbeat::default());
    heartbeat.beat();
    let serving = Arc::new(AtomicBool::new(true));
    if let Some(addr) = settings.probe_addr {
        let check = readiness_check(layout.clone(), plugin.clone(), entry.clone(), creds.clone());
        let stale = settings.resync * 3 + Duration::from_secs(30);
        ready::serve(addr, listener, serving.clone(), check, heartbeat.clone(), stale);
    }
    let mut ready_file = ReadyFile::new(settings.ready_file.clone());
    let taint = taint::Progress::start(settings.startup_taint.is_some(), Instant::now());
    let mut inst = Installer {
        undo: UndoLog::new(state.undo_log()),
        settings,
        layout,
        plugin,
        entry,
        creds,
        state,
        me,
        owner: false,
        swept: false,
        flaps: VecDeque::new(),
        removal_noted: false,
        last_flap_warning: None,
        last_injection: None,
        waiting_since: None,
        last_wait_log: None,
        node_api,
        taint,
    };

    let mut starting = true;
    let signal = loop {
        heartbeat.beat();
        let mut ready_now = false;
        let next = match inst.tick(starting) {
            Ok(Some(Chain::InPlace(_))) => {
                set_ready(&mut ready_file, true);
                ready_now = true;
                inst.remove_taint_when_due();
                inst.settings.resync
            }
            Ok(Some(Chain::NoPrimary)) => {
                set_ready(&mut ready_file, false);
                inst.settings.resync.min(WAIT_LOG_EVERY)
            }
            Ok(Some(Chain::Unsettled)) => SETTLE_RETRY,
            Ok(Some(Chain::Throttled(d))) => d,
            Ok(None) => inst.settings.resync, // passive
            Err(e) => {
                set_ready(&mut ready_file, false);
                log::error!("{}; retrying in {:?}", crate::text::chain(&e), inst.settings.resync);
                inst.settings.resync
            }
        };
        starting = false;
        serving.store(inst.owner, Ordering::Relaxed);
        let next = match inst.taint.due_in(Instant::now()) {
            Some(due) if inst.owner && ready_now => next.min(due),
            _ => next,
        };
        match watcher.wait(next) {
            Ok(w) if w.signal.is_some() => break w.signal.unwrap_or_default(),
            Ok(w) => {
                if w.other_dir {
                    log::debug!("the token or state directory changed");
                }
            }
            Err(e) => {
                log::error!("waiting for events failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    log::info!("signal {signal} received: shutting down");
    set_ready(&mut ready_file, false);
    let result = inst.shutdown(detector.as_ref());
    life.release();
    result
}

fn set_ready(file: &mut ReadyFile, ready: bool) {
    if let Err(e) = file.set(ready) {
        log::warn!("cannot update the ready file: {e}");
    }
}

fn require_dir(what: &'static str, path: &Path, hint: &'static str) -> Result<(), InstallError> {
    if path.is_dir() { Ok(()) } else { Err(InstallError::MissingDir { what, path: path.to_path_buf(), hint }) }
}

/// The `/readyz` check: the three parts, looked at on disk.
fn readiness_check(layout: Layout, plugin: Arc<Plugin>, entry: Arc<Value>, creds: Arc<Credentials>) -> ready::Check {
    Arc::new(move || {
        match plugin.in_place(&layout.binary) {
            Ok(true) => {}
            Ok(false) => return Err(NotReady::BinaryMissing(layout.binary.clone())),
            Err(source) => return Err(NotReady::BinaryUnreadable { path: layout.binary.clone(), source }),
        }
        if !creds.in_place() {
            return Err(NotReady::Credentials(creds.kubeconfig.clone()));
        }
        match conflist::scan(&layout.conf_dir, SystemTime::now()) {
            Ok(Scan::Found(p)) if p.shape == Shape::List && conflist::has_entry(&p.doc, &entry) => Ok(()),
            Ok(Scan::Found(p)) => Err(NotReady::NotOurEntry(p.path)),
            Ok(Scan::Nothing) => Err(NotReady::NoConfiguration(layout.conf_dir.clone())),
            Ok(Scan::Unsettled(p)) => Err(NotReady::Unsettled(p)),
            Err(source) => Err(NotReady::ConfDir { path: layout.conf_dir.clone(), source }),
        }
    })
}

impl<A: NodeApi> Installer<A> {
    /// One step: decide who owns the install (under the state lock) and, if we do, reconcile.
    /// Returns `None` while passive.
    fn tick(&mut self, starting: bool) -> Result<Option<Chain>, InstallError> {
        let serr = |e| InstallError::State { path: self.settings.state_dir.clone(), source: e };
        let _lock = self.state.lock().map_err(serr)?;
        let marker = self.state.marker().map_err(serr)?;
        let alive = match &marker {
            Some(m) if m.instance != self.me.instance => self.state.alive(&m.instance).map_err(serr)?,
            _ => true,
        };
        match owner::decide(&self.me, marker.as_ref(), alive, starting) {
            Decision::Own => {
                if marker.as_ref().is_none_or(|m| m.instance != self.me.instance) {
                    match &marker {
                        Some(m) if m.state == InstallState::Active => log::info!(
                            "taking over the install from {} (generation {}, {})",
                            if m.pod.is_empty() { &m.instance } else { &m.pod },
                            m.generation,
                            if alive { "shutting down" } else { "gone" }
                        ),
                        _ => log::info!("claiming the install (generation {})", self.me.generation),
                    }
                    self.state
                        .set_marker(&Marker {
                            instance: self.me.instance.clone(),
                            pod: self.me.pod.clone(),
                            generation: self.me.generation,
                            state: InstallState::Active,
                        })
                        .map_err(serr)?;
                }
                self.owner = true;
                self.reconcile().map(Some)
            }
            Decision::Defer => {
                if self.owner || starting {
                    match &marker {
                        Some(m) if m.state == InstallState::Active => log::warn!(
                            "{} (generation {}) owns this node's install: staying passive, and leaving it in place on exit",
                            if m.pod.is_empty() { &m.instance } else { &m.pod },
                            m.generation
                        ),
                        Some(m) => log::warn!(
                            "generation {} removed this node's install: an older installer does not bring it back",
                            m.generation
                        ),
                        None => {}
                    }
                }
                self.owner = false;
                Ok(None)
            }
        }
    }

    /// Puts the binary, the credentials and the conflist entry in place; writes only what differs.
    fn reconcile(&mut self) -> Result<Chain, InstallError> {
        if !self.swept {
            match self.state.sweep_dead() {
                Ok(0) => {}
                Ok(n) => log::debug!("removed {n} life-lock file(s) of installers that died"),
                Err(e) => log::warn!("cannot sweep {}: {e}", self.state.root().display()),
            }
            for dir in [&self.layout.bin_dir, &self.layout.conf_dir] {
                match atomic::sweep_temps(dir) {
                    Ok(0) => {}
                    Ok(n) => log::info!("removed {n} temporary file(s) a previous run left in {}", dir.display()),
                    Err(e) => log::warn!("cannot sweep {}: {e}", dir.display()),
                }
            }
            self.swept = true;
        }
        self.ensure_binary()?;
        let undo = &self.undo;
        let synced = self.creds.sync(|path| {
            undo.record(Record::File { path: path.to_path_buf() }).map_err(|e| io::Error::other(e.to_string()))
        })?;
        if synced.token {
            log::info!("token copy {} updated", self.creds.token.display());
        }
        if synced.kubeconfig {
            log::info!("kubeconfig {} written", self.creds.kubeconfig.display());
        }
        for path in [&self.creds.token, &self.creds.kubeconfig] {
            self.undo.record(Record::File { path: path.clone() })?; // a no-op when already recorded
        }
        self.ensure_chained()
    }

    fn ensure_binary(&mut self) -> Result<(), InstallError> {
        let target = &self.layout.binary;
        let werr = |e| InstallError::Write { path: target.clone(), source: e };
        if self.plugin.in_place(target).map_err(werr)? {
            // Ours already (a restart, or a state dir that was lost): make sure uninstall knows it.
            if self.undo.pending_at(target)?.is_none() {
                self.undo.record(Record::Binary { path: target.clone(), saved: None })?;
            }
            return Ok(());
        }
        let saved = match self.undo.pending_at(target)? {
            Some(Record::Binary { saved, .. }) => saved,
            // A binary we did not put there: keep it, so uninstall leaves the bin dir as it found it.
            _ if target.exists() => {
                let saved = self.state.saved_binary();
                let bytes = std::fs::read(target).map_err(werr)?;
                atomic::write(&saved, &bytes, 0o600).map_err(werr)?;
                Some(saved)
            }
            _ => None,
        };
        self.undo.record(Record::Binary { path: target.clone(), saved })?;
        if self.plugin.install(target)? {
            log::info!("installed {} (sha256 {})", target.display(), binary::hex(&self.plugin.checksum));
        }
        Ok(())
    }

    fn ensure_chained(&mut self) -> Result<Chain, InstallError> {
        let dir = &self.layout.conf_dir;
        let scan = conflist::scan(dir, SystemTime::now())
            .map_err(|e| InstallError::ConfDir { path: dir.clone(), source: e })?;
        let primary = match scan {
            Scan::Found(p) => p,
            Scan::Unsettled(p) => {
                log::debug!("{} is being written: looking again shortly", p.display());
                return Ok(Chain::Unsettled);
            }
            Scan::Nothing => {
                let now = Instant::now();
                let since = *self.waiting_since.get_or_insert(now);
                if self.last_wait_log.is_none_or(|t| now.duration_since(t) >= WAIT_LOG_EVERY) {
                    log::info!(
                        "no network configuration in {} yet: waiting for the primary CNI ({}s so far)",
                        dir.display(),
                        now.duration_since(since).as_secs()
                    );
                    self.last_wait_log = Some(now);
                }
                return Ok(Chain::NoPrimary);
            }
        };
        self.waiting_since = None;
        let list_path = conflist::list_path(&primary.path, primary.shape);
        self.unchain_elsewhere(&list_path)?;
        let Some(doc) = conflist::inject(&primary, &self.entry)? else {
            if self.undo.pending_at(&list_path)?.is_none() {
                // Our entry is there but unrecorded (the state dir was lost): record it, so uninstall
                // removes it. With no pristine copy, uninstall removes only our entry.
                let pristine = self.state.pristine(&primary.path);
                self.undo.record(Record::Chain {
                    path: list_path.clone(),
                    original: primary.path.clone(),
                    pristine,
                })?;
            }
            return Ok(Chain::InPlace(list_path));
        };
        let had_ours = primary.shape == Shape::List && conflist::has_any_entry(&primary.doc);
        if !had_ours && !self.removal_noted && self.undo.pending_at(&list_path)?.is_some() {
            // We had chained into this file and our entry is gone: the primary rewrote it.
            self.note_removal(&list_path);
            self.removal_noted = true;
        }
        if let Some(wait) = self.throttle() {
            return Ok(Chain::Throttled(wait));
        }
        let pristine = self.state.pristine(&primary.path);
        let werr = |path: &Path, e| InstallError::Write { path: path.to_path_buf(), source: e };
        if !had_ours {
            // The primary's own bytes, for restoring them exactly on uninstall.
            atomic::write(&pristine, &primary.bytes, 0o600).map_err(|e| werr(&pristine, e))?;
        }
        self.undo.record(Record::Chain { path: list_path.clone(), original: primary.path.clone(), pristine })?;
        let mode = undo::file_mode(&primary.path).unwrap_or(0o644);
        atomic::write(&list_path, &conflist::render(&doc), mode).map_err(|e| werr(&list_path, e))?;
        if primary.shape == Shape::Single {
            atomic::remove(&primary.path).map_err(|e| werr(&primary.path, e))?;
            log::info!("converted {} into {} and chained tproxy-cni last", primary.path.display(), list_path.display());
        } else if had_ours {
            log::info!("updated our entry in {}", list_path.display());
        } else {
            log::info!("chained tproxy-cni last in {}", list_path.display());
        }
        self.last_injection = Some(Instant::now());
        self.removal_noted = false;
        Ok(Chain::InPlace(list_path))
    }

    /// Takes our entry out of files we chained into that the runtime no longer uses (a new file now
    /// sorts first), so only the file in use carries it.
    fn unchain_elsewhere(&mut self, in_use: &Path) -> Result<(), InstallError> {
        for r in self.undo.pending()? {
            if let Record::Chain { path, .. } = &r
                && path != in_use
            {
                log::info!("{} is no longer the configuration in use: removing our entry from it", path.display());
                match undo::revert(&r) {
                    Ok(()) => self.undo.record(Record::Undone { path: path.clone() })?,
                    Err(e) => log::warn!("{}", crate::text::chain(&e)),
                }
            }
        }
        Ok(())
    }

    /// Counts a removal of our entry by someone else, and warns when it keeps happening.
    fn note_removal(&mut self, path: &Path) {
        let now = Instant::now();
        self.flaps.push_back(now);
        while self.flaps.front().is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW) {
            self.flaps.pop_front();
        }
        let fighting = self.flaps.len() >= FLAP_COUNT;
        if fighting && self.last_flap_warning.is_none_or(|t| now.duration_since(t) > FLAP_WINDOW) {
            log::warn!(
                "something rewrote {} without our entry {} times in the last {}s: the primary CNI is probably managing the \
                 whole conf dir exclusively. With Cilium set the Helm value cni.exclusive=false (agent flag --cni-exclusive=false); \
                 otherwise turn off the primary CNI's option that owns /etc/cni/net.d. Re-injecting each time meanwhile",
                path.display(),
                self.flaps.len(),
                FLAP_WINDOW.as_secs()
            );
            self.last_flap_warning = Some(now);
        } else {
            log::info!("{} was rewritten without our entry: re-injecting", path.display());
        }
    }

    /// While the primary CNI is fighting us, how long to wait before the next re-injection.
    fn throttle(&self) -> Option<Duration> {
        let now = Instant::now();
        let recent = self.flaps.iter().filter(|t| now.duration_since(**t) <= FLAP_WINDOW).count();
        let since = now.duration_since(self.last_injection?);
        (recent >= FLAP_COUNT && since < FLAP_MIN_INTERVAL).then(|| FLAP_MIN_INTERVAL - since)
    }

    /// Removes the start-up taint once everything is in place, if an attempt is due.
    fn remove_taint_when_due(&mut self) {
        if !self.owner {
            return;
        }
        let (Some(api), Some(node), Some(key)) =
            (self.node_api.as_ref(), self.settings.node_name.as_deref(), self.settings.startup_taint.as_deref())
        else {
            return;
        };
        self.taint = taint::step(self.taint, Instant::now(), api, node, key);
    }

    /// On exit: remove the install if we still own it and this is an uninstall (or cleanup is
    /// forced); otherwise leave it in place, so that pods starting meanwhile are still redirected.
    fn shutdown(&mut self, detector: Option<&Detector>) -> Result<(), InstallError> {
        // Asked before taking the state lock: the API call may take seconds, and a newcomer's
        // install must not wait for it.
        let verdict = match self.settings.cleanup_on_exit {
            CleanupOnExit::Always => Verdict::Uninstall("--cleanup-on-exit=true".into()),
            CleanupOnExit::Never => Verdict::Keep("--cleanup-on-exit=false".into()),
            CleanupOnExit::Auto if !self.owner => Verdict::Keep("this installer does not own the install".into()),
            CleanupOnExit::Auto => match detector {
                Some(d) => d.verdict(),
                None => {
                    Verdict::Keep("cannot tell an uninstall from a restart without the pod's name and namespace".into())
                }
            },
        };
        let serr = |e| InstallError::State { path: self.settings.state_dir.clone(), source: e };
        let _lock = self.state.lock().map_err(serr)?;
        let marker = self.state.marker().map_err(serr)?;
        let ours = marker.as_ref().is_some_and(|m| m.instance == self.me.instance && m.state == InstallState::Active);
        if !ours {
            match marker {
                Some(m) if m.state == InstallState::Active => log::info!(
                    "{} (generation {}) owns the install: leaving it in place",
                    if m.pod.is_empty() { &m.instance } else { &m.pod },
                    m.generation
                ),
                _ => log::info!("this installer does not own the install: nothing to remove"),
            }
            return Ok(());
        }
        match verdict {
            Verdict::Keep(why) => {
                log::info!(
                    "leaving the install in place ({why}): pods that start before the next installer runs are still \
                     redirected, or fail"
                );
                return Ok(());
            }
            Verdict::Uninstall(why) => log::info!("uninstalling: {why}"),
        }
        log::info!("removing the install");
        let result = undo::undo_all(&self.undo);
        self.state
            .set_marker(&Marker {
                instance: self.me.instance.clone(),
                pod: self.me.pod.clone(),
                generation: self.me.generation,
                state: InstallState::Removed,
            })
            .map_err(serr)?;
        match result {
            Ok(()) => {
                self.undo.discard().map_err(serr)?;
                log::info!("install removed");
                Ok(())
            }
            Err(errors) => Err(InstallError::Uninstall(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_entry_passes_plugin_settings_through_in_order() {
        let settings: Map<String, Value> = serde_json::from_str(
            r#"{"iptables_mode":"nft","exclude_namespaces":["kube-system"],"log_level":"debug","future_key":{"x":1}}"#,
        )
        .unwrap();
        let entry = plugin_entry(&settings, Path::new("/etc/cni/net.d/ZZZ-tproxy-cni-kubeconfig")).unwrap();
        assert_eq!(
            serde_json::to_string(&entry).unwrap(),
            r#"{"type":"tproxy-cni","name":"tproxy-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true},"kubeconfig":"/etc/cni/net.d/ZZZ-tproxy-cni-kubeconfig","log_level":"debug","iptables_mode":"nft","exclude_namespaces":["kube-system"],"future_key":{"x":1}}"#
        );
    }

    #[test]
    fn bad_plugin_settings_are_refused_with_the_reason() {
        let kc = Path::new("/k");
        let e = plugin_entry(&json!({"type": "x"}).as_object().unwrap().clone(), kc).unwrap_err();
        assert!(e.to_string().contains(r#"plugin setting "type" is set by the installer"#), "{e}");
        let e = plugin_entry(&json!({"iptables_mode": "xt"}).as_object().unwrap().clone(), kc).unwrap_err();
        assert!(matches!(e, InstallError::RejectedSettings(_)), "{e}");
        let e = crate::text::chain(&e);
        assert!(e.contains("rejected by the plugin: iptables_mode \"xt\" is not one of auto, nft, legacy"), "{e}");
    }
}
