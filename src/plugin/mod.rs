//! The CNI protocol: read the invocation, dispatch the command, produce exactly one JSON document.
//!
//! [`run`] is the whole plugin as a function of the environment and stdin: it never reads
//! `std::env`, never prints, and returns what to print and the exit code. All failures are mapped
//! to CNI error codes in one place, [`to_cni_error`].

pub mod args;
pub mod config;
pub mod error;
pub mod lock;
pub mod pod;
pub mod result;
pub mod version;

use std::collections::HashMap;
use std::path::PathBuf;

use thiserror::Error;

use self::args::{ArgsError, CniArgs};
use self::config::{ConfigError, NetConf};
use self::error::{CniError, Code};
use self::lock::{LockError, NetnsLock};
use self::pod::{Api, ConsulStatus, PodError, PodRef};
use self::result::ResultError;
use self::version::Version;
use crate::core::mesh::{AnnotationError, PodNetwork};
use crate::core::rules;
use crate::kernel::deadline::Deadline;
use crate::kernel::engine::{CheckError, Engine, EngineError, EngineKind, NotReady};
use crate::kernel::netfilter::{Mismatch, Mode, NetfilterError};
use crate::kernel::netlink::{self, NetlinkError};
use crate::kernel::netns::{Netns, NetnsError};
use crate::kernel::nftables::NftablesError;
use crate::kube::Class;

/// The CNI operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// The `CNI_*` environment of one call, validated.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
}

/// What the process must print on stdout and exit with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("CNI_COMMAND is not set")]
    NoCommand,
    #[error("CNI_COMMAND {} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC", crate::text::Quoted::new(.0))]
    UnknownCommand(String),
    #[error("{0} is required for {1:?}")]
    MissingEnv(&'static str, Command),
    #[error("{} {} is invalid: {}", .0, crate::text::Quoted::new(.1), .2)]
    InvalidEnv(&'static str, String, &'static str),
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0:?} needs cniVersion {1} or later (the configuration says {2})")]
    NotInVersion(Command, Version, Version),
    #[error("invalid prevResult: {0}")]
    PrevResult(#[from] ResultError),
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error(transparent)]
    Pod(#[from] PodError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
    #[error(transparent)]
    Nftables(#[from] NftablesError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("cannot serve ADD: {0}")]
    NotReady(#[source] NotReady),
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Error {
        match e {
            EngineError::Iptables(e) => Error::Netfilter(e),
            EngineError::Nftables(e) => Error::Nftables(e),
        }
    }
}

/// The one place where failures become CNI error codes.
pub fn to_cni_error(e: &Error) -> CniError {
    let code = match e {
        Error::NoCommand
        | Error::UnknownCommand(_)
        | Error::MissingEnv(..)
        | Error::InvalidEnv(..)
        | Error::Args(_) => Code::InvalidEnvironment,
        Error::Config(ConfigError::Syntax(_)) => Code::Decode,
        Error::Config(ConfigError::Version(_)) | Error::NotInVersion(..) => Code::IncompatibleVersion,
        Error::Config(_) | Error::PrevResult(_) => Code::InvalidConfig,
        Error::Annotation(_) => Code::InvalidAnnotation,
        Error::Pod(e) => match e.class() {
            Class::Transient => Code::TryAgainLater,
            Class::Config => Code::InvalidConfig,
            Class::Access | Class::Rejected | Class::NotFound => Code::ApiAccess,
        },
        Error::Netns(_) | Error::Netlink(_) | Error::Lock(LockError::Io { .. }) => Code::Netns,
        Error::Lock(LockError::Busy { .. }) => Code::TryAgainLater,
        Error::Netfilter(_) | Error::Nftables(_) | Error::Check(CheckError::Engine(_)) => Code::Netfilter,
        Error::Check(CheckError::Mismatch(_)) => Code::CheckMismatch,
        Error::NotReady(_) => Code::PluginNotAvailable,
    };
    let mut err = CniError::new(code, crate::text::chain(e));
    match e {
        Error::Netfilter(NetfilterError::Failed { input, .. }) => {
            err = err.with_details(format!("transaction:\n{input}"))
        }
        Error::Check(CheckError::Mismatch(m)) => err = err.with_details(m.0.join("\n")),
        _ => {}
    }
    err
}

/// Runs one CNI call. A panic (a bug) still ends as an error document the runtime can show.
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Outcome {
    let answer_version = config::peek_version(stdin).unwrap_or(Version::LATEST);
    let err = match std::panic::catch_unwind(|| dispatch(env, stdin)) {
        Ok(Ok(stdout)) => return Outcome { stdout, exit_code: 0 },
        Ok(Err(e)) => to_cni_error(&e),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            CniError::new(Code::Internal, format!("internal error (please report it): {what}"))
        }
    };
    log::error!("{}", err.msg);
    Outcome { stdout: err.to_json(answer_version.as_str()), exit_code: 1 }
}

fn dispatch(env: &HashMap<String, String>, stdin: &[u8]) -> Result<String, Error> {
    let command = match env.get("CNI_COMMAND").map(String::as_str) {
        None | Some("") => return Err(Error::NoCommand),
        Some(c) => Command::parse(c).ok_or_else(|| Error::UnknownCommand(c.to_owned()))?,
    };
    if command == Command::Version {
        return Ok(version_info(config::peek_version(stdin).unwrap_or(Version::LATEST)));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        // DEL must be able to clean up after any ADD, even one refused for its configuration; a
        // DEL that fails forever would leave the pod sandbox stuck on the node.
        Err(e) if command == Command::Del && !matches!(e, ConfigError::Syntax(_) | ConfigError::Version(_)) => {
            log::warn!("DEL with an invalid configuration ({e}); removing our rules with default settings");
            return del_with_defaults(env);
        }
        Err(e) => return Err(e.into()),
    };
    crate::log::configure(conf.log_level, conf.log_file.as_deref());
    let inv = invocation(env, command)?;
    crate::log::set_context(context(&inv));
    log::debug!("{command:?} (cniVersion {}, network {:?})", conf.cni_version, conf.name);
    match command {
        Command::Add => add(&conf, &inv),
        Command::Del => del(&conf, &inv),
        Command::Check => check(&conf, &inv),
        Command::Status => status(&conf),
        Command::Gc => gc(&conf),
        Command::Version => unreachable!("answered above"),
    }
}

/// ADD: find the pod's redirect, install it, pass the previous result on.
fn add(conf: &NetConf, inv: &Invocation) -> Result<String, Error> {
    // Validate everything before touching the namespace: a refused ADD changes nothing.
    let output = result::passthrough(conf.prev_result.as_deref(), conf.cni_version)?;
    let api = Api::new(conf);
    let found = pod::lookup(conf, &inv.args, &api)?;
    // Chained, the previous result says whether the pod has IPv6 and the redirect is built once.
    // Otherwise only the namespace can say: whether the pod is in a mesh does not depend on it, so
    // that is decided first and the redirect built again once the namespace is open.
    let known = conf.prev_result.as_deref().map(|prev| PodNetwork { has_ipv6: result::has_ipv6(Some(prev)) });
    let Some(redirect) = found.redirect(known.unwrap_or_default())? else {
        log::debug!("pod is not in a mesh with transparent proxy: passing through");
        return Ok(output);
    };
    let status = ConsulStatus::new(conf, &inv.args, &found, &redirect, &api);
    status.iter().for_each(|s| s.report(pod::CONSUL_STATUS_WAITING));
    // From here on, every wait is bounded by one deadline: the lock, each tool, each netlink call.
    let deadline = Deadline::after(conf.netns_timeout);
    let ns = Netns::open(inv.netns.as_deref().expect("ADD requires CNI_NETNS"))?;
    let lock = NetnsLock::acquire(&ns, deadline)?;
    let redirect = match known {
        Some(_) => redirect,
        None => found.redirect(pod_network(conf, &ns, deadline)?)?.expect("a mesh pod stays one"),
    };
    let mut prepared = netlink::prepare(&ns, redirect, deadline)?;
    let sets = rules::build(&prepared.redirect);
    let engine = Engine::new(conf.backend, conf.iptables_mode, deadline);
    let applied = engine.apply(&ns, &sets)?;
    if let Err(e) = prepared.add_address(&ns, deadline) {
        // Leave the namespace as this call found it.
        engine.undo(&ns, applied);
        return Err(e.into());
    }
    drop(lock);
    let families: Vec<_> = sets.iter().map(|s| s.family.name()).collect();
    log::info!("{} redirect installed ({}, {})", prepared.redirect.mesh(), families.join("+"), engine.name());
    status.iter().for_each(|s| s.report(pod::CONSUL_STATUS_COMPLETE));
    Ok(output)
}

/// What the dialects need to know of the pod's network: whether it has IPv6, from the previous
/// plugin's result when chained; otherwise (Multus, a list of our own) nothing says, so the
/// namespace is asked, and any IPv6 address but `::1` counts: a pod whose IPv6 is not redirected
/// would bypass the proxy.
fn pod_network(conf: &NetConf, ns: &Netns, deadline: Deadline) -> Result<PodNetwork, NetlinkError> {
    let has_ipv6 = match conf.prev_result.as_deref() {
        Some(prev) => result::has_ipv6(Some(prev)),
        None => netlink::has_ipv6(ns, deadline)?,
    };
    Ok(PodNetwork { has_ipv6 })
}

/// DEL: remove whatever of ours is in the namespace. Best effort, as the spec expects of DEL: a
/// namespace that is gone needs nothing, and a failure (a missing tool, a tool or the kernel
/// refusing, a hung tool, a lock held past the deadline) is logged and the call still succeeds —
/// our rules live in the pod's namespace and go with it, while a DEL that fails would keep the
/// sandbox from being torn down. Only malformed input fails DEL (in [`dispatch`]).
fn del(conf: &NetConf, inv: &Invocation) -> Result<String, Error> {
    remove_from(inv.netns.as_deref(), &[conf.backend], conf.iptables_mode, Deadline::after(conf.netns_timeout));
    Ok(String::new())
}

fn del_with_defaults(env: &HashMap<String, String>) -> Result<String, Error> {
    let inv = invocation(env, Command::Del)?;
    // The configuration does not say which engine installed our rules: both remove theirs.
    let engines = [EngineKind::Nftables, EngineKind::Iptables];
    remove_from(inv.netns.as_deref(), &engines, Mode::Auto, Deadline::after(config::DEFAULT_NETNS_TIMEOUT));
    Ok(String::new())
}

fn remove_from(netns: Option<&std::path::Path>, engines: &[EngineKind], mode: Mode, deadline: Deadline) {
    let Some(path) = netns else {
        log::debug!("DEL without CNI_NETNS: nothing to remove");
        return;
    };
    let ns = match Netns::open(path) {
        Ok(ns) => ns,
        Err(e) if e.is_gone() => {
            log::debug!("{e}: nothing to remove");
            return;
        }
        Err(e) => {
            log::warn!("DEL: {}: nothing removed (our rules go with the namespace)", crate::text::chain(&e));
            return;
        }
    };
    let lock = match NetnsLock::acquire(&ns, deadline) {
        Ok(lock) => Some(lock),
        Err(e @ LockError::Busy { .. }) => {
            log::warn!("DEL: {e}: nothing removed (our rules go with the namespace)");
            return;
        }
        Err(e) => {
            log::warn!("DEL: {}: removing our rules without it", crate::text::chain(&e));
            None
        }
    };
    for kind in engines {
        let engine = Engine::new(*kind, mode, deadline);
        match engine.remove(&ns) {
            Ok(removed) => {
                if let Err(e) = netlink::release(&ns, &removed, deadline) {
                    log::warn!("DEL: {}: the address goes with the namespace", crate::text::chain(&e));
                }
            }
            Err(e) => {
                log::warn!("DEL: cannot remove our rules: {} (they go with the namespace)", crate::text::chain(&e))
            }
        }
        engine.forget(&ns);
    }
    if let Some(lock) = lock {
        lock.remove();
    }
}

/// CHECK: the namespace must hold exactly the rules ADD would install now.
fn check(conf: &NetConf, inv: &Invocation) -> Result<String, Error> {
    if !conf.cni_version.has_check() {
        return Err(Error::NotInVersion(Command::Check, Version::V0_4_0, conf.cni_version));
    }
    let found = pod::lookup(conf, &inv.args, &Api::new(conf))?;
    let in_mesh = found.redirect(PodNetwork::default())?.is_some();
    let deadline = Deadline::after(conf.netns_timeout);
    let ns = Netns::open(inv.netns.as_deref().expect("CHECK requires CNI_NETNS"))?;
    let _lock = NetnsLock::acquire(&ns, deadline)?;
    let redirect = if in_mesh { found.redirect(pod_network(conf, &ns, deadline)?)? } else { None };
    let (sets, address_diffs) = match redirect {
        Some(r) => {
            let (r, diffs) = netlink::inspect(&ns, r, deadline)?;
            (rules::build(&r), diffs)
        }
        None => (Vec::new(), Vec::new()),
    };
    match Engine::new(conf.backend, conf.iptables_mode, deadline).check(&ns, &sets) {
        Ok(()) if address_diffs.is_empty() => Ok(String::new()),
        Ok(()) => Err(CheckError::Mismatch(Mismatch(address_diffs)).into()),
        Err(CheckError::Mismatch(Mismatch(mut diffs))) => {
            diffs.extend(address_diffs);
            Err(CheckError::Mismatch(Mismatch(diffs)).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// STATUS: ready when every tool ADD may run is installed (iptables engine), or when the kernel has
/// every nf_tables feature the engine uses (nftables engine).
fn status(conf: &NetConf) -> Result<String, Error> {
    if !conf.cni_version.has_status_and_gc() {
        return Err(Error::NotInVersion(Command::Status, Version::V1_1_0, conf.cni_version));
    }
    let deadline = Deadline::after(conf.netns_timeout);
    Engine::new(conf.backend, conf.iptables_mode, deadline).ready().map_err(Error::NotReady)?;
    Ok(String::new())
}

/// GC: our rules live and die with each pod's namespace, so there is never anything to collect.
fn gc(conf: &NetConf) -> Result<String, Error> {
    if !conf.cni_version.has_status_and_gc() {
        return Err(Error::NotInVersion(Command::Gc, Version::V1_1_0, conf.cni_version));
    }
    let n = conf.valid_attachments.as_ref().map_or(0, Vec::len);
    log::debug!("GC with {n} valid attachment(s): nothing to collect");
    Ok(String::new())
}

fn version_info(v: Version) -> String {
    let supported: Vec<&str> = Version::SUPPORTED.iter().map(|v| v.as_str()).collect();
    serde_json::json!({ "cniVersion": v.as_str(), "supportedVersions": supported }).to_string()
}

fn invocation(env: &HashMap<String, String>, command: Command) -> Result<Invocation, Error> {
    let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let needs_sandbox = matches!(command, Command::Add | Command::Del | Command::Check);
    let container_id = get("CNI_CONTAINERID");
    let ifname = get("CNI_IFNAME");
    let netns = get("CNI_NETNS").map(PathBuf::from);
    if needs_sandbox {
        let id = container_id.as_deref().ok_or(Error::MissingEnv("CNI_CONTAINERID", command))?;
        if !valid_container_id(id) {
            return Err(Error::InvalidEnv("CNI_CONTAINERID", id.to_owned(), "use letters, digits, _ . - only"));
        }
        let name = ifname.as_deref().ok_or(Error::MissingEnv("CNI_IFNAME", command))?;
        if !valid_ifname(name) {
            return Err(Error::InvalidEnv("CNI_IFNAME", name.to_owned(), "not a valid interface name"));
        }
        if command != Command::Del && netns.is_none() {
            return Err(Error::MissingEnv("CNI_NETNS", command));
        }
    }
    let args = CniArgs::parse(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default())?;
    Ok(Invocation { command, container_id, netns, ifname, args })
}

fn valid_container_id(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn context(inv: &Invocation) -> String {
    // Characters, not bytes: STATUS and GC do not validate the ID, which may be any text.
    let short: String = inv.container_id.as_deref().unwrap_or("-").chars().take(12).collect();
    format!("container={short} pod={}", PodRef::from_args(&inv.args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn code(o: &Outcome) -> u64 {
        let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
        v["code"].as_u64().unwrap()
    }

    const CONF: &[u8] = br#"{"cniVersion":"1.0.0","name":"n","type":"tproxy-cni"}"#;

    #[test]
    fn version_lists_every_supported_version_in_the_callers_version() {
        for v in Version::SUPPORTED {
            let stdin = format!(r#"{{"cniVersion":"{v}"}}"#);
            let o = run(&env(&[("CNI_COMMAND", "VERSION")]), stdin.as_bytes());
            assert_eq!(o.exit_code, 0);
            let doc: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
            assert_eq!(doc["cniVersion"], v.as_str());
            assert_eq!(doc["supportedVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
        }
    }

    #[test]
    fn missing_or_unknown_command_is_code_4() {
        assert_eq!(code(&run(&env(&[]), CONF)), 4);
        assert_eq!(code(&run(&env(&[("CNI_COMMAND", "UPDATE")]), CONF)), 4);
    }

    #[test]
    fn add_needs_its_environment() {
        let o = run(&env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]), CONF);
        assert_eq!((o.exit_code, code(&o)), (1, 4));
        assert!(o.stdout.contains("CNI_CONTAINERID is required"), "{}", o.stdout);
        let o = run(&env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]), CONF);
        assert!(o.stdout.contains("CNI_NETNS is required"), "{}", o.stdout);
        let o = run(
            &env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "a/b"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]),
            CONF,
        );
        assert_eq!(code(&o), 4);
    }

    #[test]
    fn stdin_errors_get_their_spec_codes() {
        let add =
            env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]);
        assert_eq!(code(&run(&add, b"{")), 6);
        assert_eq!(code(&run(&add, br#"{"cniVersion":"9.9.9"}"#)), 1);
        assert_eq!(code(&run(&add, br#"{"cniVersion":"1.0.0","iptables_mode":"xt"}"#)), 7);
        assert_eq!(code(&run(&add, br#"{"cniVersion":"1.0.0","prevResult":[1]}"#)), 7);
    }

    #[test]
    fn add_without_annotations_passes_through_without_touching_anything() {
        // The netns path does not exist: proof that a pass-through never opens it.
        let add = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent"),
        ]);
        let stdin = br#"{"cniVersion":"1.0.0","name":"n","type":"tproxy-cni","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}],"x":1}}"#;
        let o = run(&add, stdin);
        assert_eq!(
            o,
            Outcome {
                stdout: r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/24"}],"x":1}"#.into(),
                exit_code: 0
            }
        );
    }

    #[test]
    fn check_status_gc_are_refused_in_versions_without_them() {
        let e =
            env(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]);
        assert_eq!(code(&run(&e, br#"{"cniVersion":"0.3.1"}"#)), 1);
        assert_eq!(code(&run(&env(&[("CNI_COMMAND", "STATUS")]), CONF)), 1);
        assert_eq!(code(&run(&env(&[("CNI_COMMAND", "GC")]), CONF)), 1);
        let gc = br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
        assert_eq!(run(&env(&[("CNI_COMMAND", "GC")]), gc), Outcome { stdout: String::new(), exit_code: 0 });
    }

    #[test]
    fn del_of_a_gone_namespace_succeeds_even_with_a_bad_config() {
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/nonexistent"),
        ]);
        assert_eq!(run(&del, CONF).exit_code, 0);
        assert_eq!(run(&del, br#"{"cniVersion":"1.0.0","iptables_mode":"xt"}"#).exit_code, 0);
        let no_netns = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(run(&no_netns, CONF).exit_code, 0);
    }
}
