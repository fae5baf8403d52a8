//! `tproxy-cni install`: the installer's command line, read once here and handed down as
//! [`crate::installer::Settings`].

use std::io;
use std::net::{AddrParseError, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::installer::taint::InvalidTaintKey;
use crate::installer::uninstall::{CleanupOnExit, Detector};
use crate::installer::{self as install, InstallError, Settings};
use crate::kube::{Client, Kubeconfig, KubeconfigError};

/// Install the plugin on this node and keep it installed until SIGTERM: the DaemonSet's command.
///
/// Copies this binary into the host's CNI bin dir, writes the plugin's kubeconfig and token copy into
/// the CNI conf dir, and chains a tproxy-cni entry last into the network configuration the runtime
/// uses (converting a single-plugin .conf into a .conflist). Watches the conf dir and re-injects the
/// entry when the primary CNI rewrites its file; keeps the token copy current. Ready (GET /readyz,
/// and the ready file) only while the binary, the entry and the kubeconfig are all in place.
/// Restarts, crashes and upgrades leave everything in place; on SIGTERM or SIGINT it removes exactly
/// what it installed only when its DaemonSet is being deleted (see --cleanup-on-exit), and only if
/// no newer installer on the node owns the install. Every flag can also be set through the
/// environment variable named with it.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Host CNI binary directory, as mounted in this container.
    #[arg(long, env = "TPROXY_CNI_BIN_DIR", default_value = "/opt/cni/bin", value_name = "DIR")]
    cni_bin_dir: PathBuf,
    /// Host CNI network configuration directory, as mounted in this container.
    #[arg(long, env = "TPROXY_CNI_CONF_DIR", default_value = "/etc/cni/net.d", value_name = "DIR")]
    cni_conf_dir: PathBuf,
    /// Host directory for the undo log and the ownership marker (a hostPath shared by upgrades).
    #[arg(long, env = "TPROXY_CNI_STATE_DIR", default_value = "/var/lib/tproxy-cni", value_name = "DIR")]
    state_dir: PathBuf,
    /// The plugin binary to install [default: this executable].
    #[arg(long, env = "TPROXY_CNI_SOURCE_BINARY", value_name = "FILE")]
    source_binary: Option<PathBuf>,
    /// JSON object of plugin settings copied into the conflist entry (e.g. from a ConfigMap):
    /// log_level, iptables_mode, exclude_namespaces, … — any key the plugin accepts.
    #[arg(long, env = "TPROXY_CNI_PLUGIN_CONFIG", value_name = "FILE")]
    plugin_config: Option<PathBuf>,
    /// The kubeconfig path to write into the entry, as seen on the host [default: the kubeconfig in
    /// --cni-conf-dir]. Set it when the conf dir is mounted at a different path than on the host.
    #[arg(long, env = "TPROXY_CNI_HOST_KUBECONFIG", value_name = "PATH")]
    host_kubeconfig: Option<PathBuf>,
    /// API server URL reachable from the host network namespace [default: https://
    /// $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, env = "TPROXY_CNI_API_SERVER", value_name = "URL")]
    api_server: Option<String>,
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", hide = true)]
    kubernetes_service_host: Option<String>,
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", hide = true)]
    kubernetes_service_port: Option<u16>,
    /// The projected service-account volume whose token and CA the plugin gets.
    #[arg(
        long,
        env = "TPROXY_CNI_SERVICE_ACCOUNT_DIR",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount",
        value_name = "DIR"
    )]
    service_account_dir: PathBuf,
    /// This pod's UID (downward API metadata.uid).
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// This pod's name (downward API metadata.name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This pod's namespace (downward API metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// The DaemonSet generation of this pod (downward API metadata.labels['pod-template-generation']):
    /// during a rolling update the higher generation owns the node's install.
    #[arg(long, env = "POD_TEMPLATE_GENERATION", default_value_t = 0)]
    generation: u64,
    /// This node's name (downward API spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Start-up taint to remove from this node once the plugin is in place (e.g. tproxy-cni.io/not-ready).
    #[arg(long, env = "TPROXY_CNI_STARTUP_TAINT", value_name = "KEY")]
    startup_taint: Option<String>,
    /// Address for GET /readyz and /livez; "off" disables the listener.
    #[arg(long, env = "TPROXY_CNI_PROBE_ADDR", default_value = "127.0.0.1:9823", value_name = "ADDR|off")]
    probe_addr: String,
    /// File present exactly while ready (for an exec probe).
    #[arg(long, env = "TPROXY_CNI_READY_FILE", value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Periodic full resync under the directory watch (e.g. 10s, 500ms, 2m).
    #[arg(long, env = "TPROXY_CNI_RESYNC_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    resync_interval: Duration,
    /// On SIGTERM/SIGINT, when this installer owns the install: auto removes it only when the
    /// installer's DaemonSet is deleted (uninstall), and leaves it in place on restarts, upgrades
    /// and whenever the API server cannot tell; true always removes it; false never does.
    #[arg(long, env = "TPROXY_CNI_CLEANUP_ON_EXIT", value_enum, default_value_t = CleanupOnExit::Auto)]
    cleanup_on_exit: CleanupOnExit,
    /// The installer's own log level: error, warn, info, debug, trace.
    #[arg(long, env = "TPROXY_CNI_LOG_LEVEL", default_value = "info", value_parser = parse_level)]
    log_level: log::LevelFilter,
}

/// Why the installer did not start, or stopped.
#[derive(Debug, Error)]
enum StartError {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Install(#[from] InstallError),
}

/// Arguments that cannot become the installer's [`Settings`]. Flag values are shown with Rust's
/// escapes (`{:?}`), so a newline in an environment variable stays on the message's one line.
#[derive(Debug, Error)]
pub enum ArgsError {
    #[error("no API server address: set --api-server (or run in a pod, where KUBERNETES_SERVICE_HOST is set)")]
    NoApiServer,
    #[error("--api-server {url:?} is not usable: {why}")]
    ApiServer { url: String, why: &'static str },
    #[error("cannot find this executable: set --source-binary")]
    CurrentExe(#[source] io::Error),
    #[error("cannot read --plugin-config {}", .path.display())]
    ReadPluginConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--plugin-config {} is not valid JSON", .path.display())]
    PluginConfigJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("--plugin-config {} must hold a JSON object", .0.display())]
    PluginConfigNotAnObject(PathBuf),
    #[error("--probe-addr {value:?} is not an address:port")]
    ProbeAddr {
        value: String,
        #[source]
        source: AddrParseError,
    },
    #[error("--startup-taint")]
    TaintKey(#[source] InvalidTaintKey),
    #[error("--startup-taint needs --node-name (NODE_NAME from the downward API)")]
    TaintWithoutNode,
    #[error("--resync-interval must be at least 100ms")]
    ResyncTooShort,
    #[error("--startup-taint needs the pod's service account")]
    ServiceAccount(#[source] KubeconfigError),
    #[error(
        "--cleanup-on-exit=auto needs the pod's service account to tell an uninstall from a restart (or set \
         --cleanup-on-exit to true or false)"
    )]
    DetectorServiceAccount(#[source] KubeconfigError),
    #[error("--pod-namespace {namespace:?} / --pod-name {name:?} cannot be a Kubernetes pod's")]
    PodName { namespace: String, name: String },
}

/// A flag value that is not a log level.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not one of error, warn, info, debug, trace")]
pub struct InvalidLevel(String);

/// A flag value that is not a duration such as `500ms`, `10s`, `2m`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?} is not a duration such as 500ms, 10s, 2m")]
pub struct InvalidDuration(String);

/// Runs the installer; the process exit code.
pub fn main(args: InstallArgs) -> ExitCode {
    crate::log::init(args.log_level);
    let result = settings(args).map_err(StartError::from).and_then(|(s, pod)| {
        let client = node_client(&s)?;
        let detector = detector(&s, pod)?;
        Ok(install::run(s, client, detector)?)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tproxy-cni install: {}", crate::text::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Validates the arguments into settings (and the pod's namespace and name, when both are known);
/// no host file is touched here.
fn settings(a: InstallArgs) -> Result<(Settings, Option<(String, String)>), ArgsError> {
    let api_server = match (a.api_server, a.kubernetes_service_host) {
        (Some(url), _) => url,
        (None, Some(host)) => crate::installer::kubeconfig::server_url(&host, a.kubernetes_service_port.unwrap_or(443)),
        (None, None) => return Err(ArgsError::NoApiServer),
    };
    let api_server = crate::kube::kubeconfig::parse_server(&api_server)
        .map_err(|why| ArgsError::ApiServer { url: api_server.clone(), why })?;
    let source_binary = match a.source_binary {
        Some(p) => p,
        None => std::env::current_exe().map_err(ArgsError::CurrentExe)?,
    };
    let plugin_settings = match &a.plugin_config {
        Some(p) => load_plugin_settings(p)?,
        None => Map::new(),
    };
    let probe_addr = match a.probe_addr.as_str() {
        "off" | "" => None,
        s => Some(s.parse::<SocketAddr>().map_err(|source| ArgsError::ProbeAddr { value: s.to_owned(), source })?),
    };
    if let Some(key) = &a.startup_taint {
        crate::installer::taint::validate_key(key).map_err(ArgsError::TaintKey)?;
        if a.node_name.as_deref().is_none_or(str::is_empty) {
            return Err(ArgsError::TaintWithoutNode);
        }
    }
    if a.resync_interval < Duration::from_millis(100) {
        return Err(ArgsError::ResyncTooShort);
    }
    let (pod_namespace, pod_name) = (a.pod_namespace.filter(|s| !s.is_empty()), a.pod_name.filter(|s| !s.is_empty()));
    let identity = match (pod_namespace.as_deref(), pod_name.as_deref()) {
        (Some(ns), Some(name)) => Some((ns.to_owned(), name.to_owned())),
        _ => None,
    };
    let pod = match (pod_namespace, pod_name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name,
        _ => String::new(),
    };
    let settings = Settings {
        cni_bin_dir: a.cni_bin_dir,
        cni_conf_dir: a.cni_conf_dir,
        state_dir: a.state_dir,
        source_binary,
        plugin_settings,
        host_kubeconfig: a.host_kubeconfig,
        api_server,
        service_account_dir: a.service_account_dir,
        pod_uid: a.pod_uid,
        pod,
        generation: a.generation,
        node_name: a.node_name.filter(|n| !n.is_empty()),
        startup_taint: a.startup_taint,
        probe_addr,
        ready_file: a.ready_file,
        resync: a.resync_interval,
        cleanup_on_exit: a.cleanup_on_exit,
    };
    Ok((settings, identity))
}

/// The API client that removes the start-up taint, when one is configured: the installer pod's own
/// service account, talking to the API server the plugin is given.
fn node_client(s: &Settings) -> Result<Option<Client>, ArgsError> {
    if s.startup_taint.is_none() {
        return Ok(None);
    }
    let mut config =
        Kubeconfig::in_cluster("127.0.0.1", "443", &s.service_account_dir).map_err(ArgsError::ServiceAccount)?;
    config.server = s.api_server.clone();
    Ok(Some(Client::new(config, crate::kube::DEFAULT_TIMEOUT)))
}

/// The uninstall detector, for `--cleanup-on-exit=auto` in a pod: the installer pod's own service
/// account, talking to the API server the plugin is given.
fn detector(s: &Settings, pod: Option<(String, String)>) -> Result<Option<Detector>, ArgsError> {
    let (CleanupOnExit::Auto, Some((namespace, name))) = (s.cleanup_on_exit, pod) else { return Ok(None) };
    if !crate::kube::is_valid_name(&namespace) || !crate::kube::is_valid_name(&name) {
        return Err(ArgsError::PodName { namespace, name });
    }
    let mut config = Kubeconfig::in_cluster("127.0.0.1", "443", &s.service_account_dir)
        .map_err(ArgsError::DetectorServiceAccount)?;
    config.server = s.api_server.clone();
    Ok(Some(Detector::new(Client::new(config, crate::kube::DEFAULT_TIMEOUT), namespace, name)))
}

/// Reads the plugin settings: a JSON object (an empty file means none).
fn load_plugin_settings(path: &Path) -> Result<Map<String, Value>, ArgsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ArgsError::ReadPluginConfig { path: path.to_owned(), source })?;
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ArgsError::PluginConfigNotAnObject(path.to_owned())),
        Err(source) => Err(ArgsError::PluginConfigJson { path: path.to_owned(), source }),
    }
}

/// Parses a log level name.
fn parse_level(s: &str) -> Result<log::LevelFilter, InvalidLevel> {
    match s.parse::<log::LevelFilter>() {
        Ok(l) if l != log::LevelFilter::Off => Ok(l),
        _ => Err(InvalidLevel(s.to_owned())),
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, InvalidDuration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let invalid = || InvalidDuration(s.to_owned());
    let n: u64 = num.parse().map_err(|_| invalid())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "s", "1.5s", "10x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
