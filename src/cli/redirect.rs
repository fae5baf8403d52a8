//! `tproxy-cni redirect`: install a mesh's transparent-proxy redirect on a host or VM (or in any
//! network namespace), through the same engine as the CNI plugin: flags or a mesh's configuration
//! file → the dialect's validated constructor → `rules::build` → `Netfilter::apply`.

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args};
use ipnet::IpNet;
use thiserror::Error;

use super::Report;
use super::namespace::NamespaceArgs;
use super::ssh::{self, Session, SshConnection};
use super::user::{User, UserError, Users};
use crate::mesh::PodNetwork;
use crate::mesh::consul::{self, Settings, Spelling};
use crate::netfilter::{NetfilterError, PlanError};
use crate::netns::{Netns, NetnsError};
use crate::redirect::{
    Cidrs, Port, PortRange, Redirect, ValueError, parse_cidr, parse_ip, parse_port, parse_port_range,
};
use crate::rules;

/// `tproxy-cni redirect` arguments.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("mesh").required(true).args(["proxy_uid", "consul_config"])))]
pub struct RedirectArgs {
    #[command(flatten)]
    pub namespace: NamespaceArgs,

    /// Do every check, print the transactions that would be sent, and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Install even if the redirect would cut an SSH session in the namespace.
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub consul: ConsulFlags,
}

/// Consul's redirect, flag for flag as `consul connect redirect-traffic` takes it (with two dashes).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Consul (as consul connect redirect-traffic)")]
pub struct ConsulFlags {
    /// The proxy's user, a UID or a user name: its traffic is never redirected.
    #[arg(long, value_name = "USER", value_parser = User::parse)]
    pub proxy_uid: Option<User>,

    /// The proxy's inbound listener port.
    #[arg(long, value_name = "PORT", value_parser = port, default_value = "20000", conflicts_with = "consul_config")]
    pub proxy_inbound_port: Port,

    /// The proxy's outbound listener port.
    #[arg(long, value_name = "PORT", value_parser = port, default_value = "15001", conflicts_with = "consul_config")]
    pub proxy_outbound_port: Port,

    /// A user whose traffic is not redirected: a UID, a range (1000-1999) or a name. Repeatable.
    #[arg(long, value_name = "USER", value_parser = Users::parse, conflicts_with = "consul_config")]
    pub exclude_uid: Vec<Users>,

    /// An inbound port (or range, 8000:9000) not redirected. Repeatable.
    #[arg(long, value_name = "PORT", value_parser = port_range, conflicts_with = "consul_config")]
    pub exclude_inbound_port: Vec<PortRange>,

    /// An outbound port (or range) not redirected. Repeatable.
    #[arg(long, value_name = "PORT", value_parser = port_range, conflicts_with = "consul_config")]
    pub exclude_outbound_port: Vec<PortRange>,

    /// An outbound destination (CIDR or address, either family) not redirected. Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = cidr, conflicts_with = "consul_config")]
    pub exclude_outbound_cidr: Vec<IpNet>,

    /// Consul DNS's address: DNS to it on port 53 goes to --consul-dns-port; alone, all DNS goes to it.
    #[arg(long, value_name = "IP", value_parser = ip, conflicts_with = "consul_config")]
    pub consul_dns_ip: Option<IpAddr>,

    /// Consul DNS's port: DNS to --consul-dns-ip (default: loopback) on port 53 is sent there.
    #[arg(long, value_name = "PORT", value_parser = port, conflicts_with = "consul_config")]
    pub consul_dns_port: Option<Port>,

    /// Consul's dual-stack mode: DNS is served on ::1 (give --consul-dns-ip ::1), IPv4 gets no DNS rules.
    #[arg(long)]
    pub dual_stack: bool,

    /// Read the configuration from consul's redirect JSON (as its webhook and Nomad write it:
    /// ProxyUserID, ProxyInboundPort, ExcludeInboundPorts, …) instead of flags; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub consul_config: Option<PathBuf>,
}

/// Flags spell Consul's settings this way in messages.
const CONSUL_FLAGS: Spelling = Spelling {
    proxy_uid: "--proxy-uid",
    inbound_port: "--proxy-inbound-port",
    dns_ip: "--consul-dns-ip",
    dual_stack: "--dual-stack",
};

fn port(s: &str) -> Result<Port, ValueError> {
    parse_port(s, "port")
}

fn port_range(s: &str) -> Result<PortRange, ValueError> {
    parse_port_range(s, "port")
}

fn cidr(s: &str) -> Result<IpNet, ValueError> {
    parse_cidr(s, "CIDR")
}

fn ip(s: &str) -> Result<IpAddr, ValueError> {
    parse_ip(s, "address")
}

/// Why `redirect` did not install anything.
#[derive(Debug, Error)]
pub enum RedirectError {
    #[error("cannot read {}", .path.display())]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{from}")]
    Consul {
        from: String,
        #[source]
        source: consul::ConfigError,
    },
    #[error("{flag}")]
    User {
        flag: &'static str,
        #[source]
        source: UserError,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot read the network interfaces of the namespace")]
    Interfaces(#[source] std::io::Error),
    #[error("cannot look for SSH sessions in the namespace (pass --force to install without this check)")]
    SshCheck(#[source] std::io::Error),
    #[error(
        "refusing to install: the redirect would send inbound TCP port {port} to the proxy, cutting {session} \
         and every new login; exclude it with {fix}, or pass --force to install anyway",
        port = .session.server.port()
    )]
    SshSession { session: Session, fix: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
}

/// Builds the redirect, checks it against the namespace, and installs it; returns what to print
/// (with `--dry-run`, the transactions instead). `ssh_connection` is the process's
/// `SSH_CONNECTION`, read at the command line's edge.
pub(super) fn run(args: &RedirectArgs, ssh_connection: Option<&str>) -> Result<Report, RedirectError> {
    let ns = args.namespace.open()?;
    let net = PodNetwork { has_ipv6: has_ipv6(&ns).map_err(RedirectError::Interfaces)? };
    let (redirect, source) = consul_redirect(&args.consul, net)?;
    let sets = rules::build(&redirect);
    if !args.force {
        ssh_guard(&ns, &redirect, &source, ssh_connection)?;
    }
    let nf = args.namespace.netfilter();
    let plan = nf.plan_apply(&ns, &sets)?;
    let where_ = args.namespace.describe();
    if args.dry_run {
        return Ok(Report::out(plan.render()));
    }
    nf.apply(&ns, &sets)?;
    let families: Vec<&str> = sets.iter().map(|s| s.family.name()).collect();
    let verb = if plan.steps.iter().any(|s| s.ours_before.rules > 0) { "replaced" } else { "installed" };
    Ok(Report::out(format!(
        "tproxy-cni: {} redirect {verb} in {where_} ({}, iptables-{})\n",
        redirect.mesh(),
        families.join("+"),
        nf.backend().name()
    )))
}

/// Where the configuration came from, to point at the right fix in messages.
enum Source {
    ConsulFlags,
    ConsulFile(PathBuf),
}

impl Source {
    fn exclude_inbound_port_fix(&self, port: u16) -> String {
        match self {
            Source::ConsulFlags => format!("--exclude-inbound-port {port}"),
            Source::ConsulFile(p) => format!("\"{port}\" in ExcludeInboundPorts of {}", p.display()),
        }
    }
}

/// Consul's redirect from flags or from its JSON, through the dialect's one validated constructor.
fn consul_redirect(f: &ConsulFlags, net: PodNetwork) -> Result<(Redirect, Source), RedirectError> {
    if let Some(path) = &f.consul_config {
        let text = read_config(path)?;
        let from = format!("--consul-config {}", path.display());
        let invalid = |source| RedirectError::Consul { from: from.clone(), source };
        let settings = Settings { dual_stack: f.dual_stack, ..consul::parse_config(&text).map_err(invalid)? };
        let spelling = Spelling { dual_stack: CONSUL_FLAGS.dual_stack, ..Spelling::JSON };
        let redirect = settings.validate(net, &spelling).map_err(invalid)?;
        return Ok((Redirect::Consul(redirect), Source::ConsulFile(path.clone())));
    }
    let user_err = |flag| move |source| RedirectError::User { flag, source };
    let proxy = f.proxy_uid.as_ref().expect("clap requires --proxy-uid or --consul-config");
    let mut exclude_outbound_cidrs = Cidrs::default();
    f.exclude_outbound_cidr.iter().for_each(|n| exclude_outbound_cidrs.push(*n));
    let settings = Settings {
        proxy_uid: Some(proxy.resolve().map_err(user_err("--proxy-uid"))?),
        inbound_port: Some(f.proxy_inbound_port),
        outbound_port: Some(f.proxy_outbound_port),
        exclude_inbound_ports: f.exclude_inbound_port.clone(),
        exclude_outbound_ports: f.exclude_outbound_port.clone(),
        exclude_outbound_cidrs,
        exclude_uids: f
            .exclude_uid
            .iter()
            .map(|u| u.resolve().map_err(user_err("--exclude-uid")))
            .collect::<Result<_, _>>()?,
        dns_ip: f.consul_dns_ip,
        dns_port: f.consul_dns_port,
        dual_stack: f.dual_stack,
    };
    let redirect = settings
        .validate(net, &CONSUL_FLAGS)
        .map_err(|source| RedirectError::Consul { from: "invalid flags".into(), source })?;
    Ok((Redirect::Consul(redirect), Source::ConsulFlags))
}

fn read_config(path: &Path) -> Result<String, RedirectError> {
    let read_err = |source| RedirectError::ReadConfig { path: path.to_owned(), source };
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(read_err)?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(read_err)
}

/// Does the namespace have IPv6 at all? Then it gets an IPv6 pass: otherwise its IPv6 traffic would
/// bypass the proxy. (The kernel lists no address in `if_inet6` when IPv6 is off.)
fn has_ipv6(ns: &Netns) -> std::io::Result<bool> {
    match ns.read_proc_net("if_inet6") {
        Ok(text) => Ok(text.lines().any(|l| !l.trim().is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Refuses when the redirect would capture an SSH session in the namespace (see `cli::ssh`).
fn ssh_guard(
    ns: &Netns,
    redirect: &Redirect,
    source: &Source,
    ssh_connection: Option<&str>,
) -> Result<(), RedirectError> {
    let current = ssh_connection.and_then(SshConnection::parse);
    let mut sockets = Vec::new();
    for table in ["tcp", "tcp6"] {
        match ns.read_proc_net(table) {
            Ok(text) => sockets.extend(ssh::parse_tcp_table(&text)),
            // No IPv6 in the kernel: no tcp6 table, and no IPv6 session either.
            Err(e) if table == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RedirectError::SshCheck(e)),
        }
    }
    let sessions = ssh::sessions(&sockets, current.as_ref());
    // Your own session first, so the message names it.
    let at_risk = sessions
        .iter()
        .filter(|s| ssh::captures_inbound(redirect, s.client.ip(), s.server.port()))
        .max_by_key(|s| s.yours);
    if let Some(session) = at_risk {
        return Err(RedirectError::SshSession {
            session: *session,
            fix: source.exclude_inbound_port_fix(session.server.port()),
        });
    }
    for port in ssh::listening_ssh_ports(&sockets, current.as_ref()) {
        if ssh::captures_inbound(redirect, IpAddr::from([0, 0, 0, 0]), port) {
            log::warn!(
                "sshd listens on port {port} and the redirect sends inbound TCP to that port to the proxy: \
                 new SSH logins will not reach sshd (exclude it with {})",
                source.exclude_inbound_port_fix(port)
            );
        }
    }
    Ok(())
}
