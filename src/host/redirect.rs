//! `tproxy-cni redirect`: install a mesh's transparent-proxy redirect on a host or VM (or in any
//! network namespace), through the same engine as the CNI plugin: flags or a mesh's configuration
//! file → the validated constructor (`core::mesh::consul_host` or `kuma_host`: the dialect's checks,
//! then the rule budget, as for a pod) → `rules::build` → `Engine::apply`.
//!
//! The mesh is the one whose flags are given: Consul's (`consul connect redirect-traffic`'s, or
//! `--consul-config`) or Kuma's (`kumactl install transparent-proxy`'s, or `--kuma-config`).

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use ipnet::IpNet;
use thiserror::Error;

use super::Report;
use super::namespace::NamespaceArgs;
use super::ssh::{self, Session, SshConnection};
use super::user::{User, UserError, Users};
use crate::core::mesh::consul::{self, Settings, SettingsError, Spelling};
use crate::core::mesh::kuma::{self, TproxyConfigError};
use crate::core::mesh::{self, PodNetwork};
use crate::core::redirect::{
    Cidrs, Port, PortRange, Redirect, ValueError, parse_cidr, parse_ip, parse_port, parse_port_range,
};
use crate::core::rules;
use crate::kernel::deadline::Deadline;
use crate::kernel::engine::{EngineError, PlanError};
use crate::kernel::netfilter::DEFAULT_BUDGET;
use crate::kernel::netlink::{self, NetlinkError};
use crate::kernel::netns::{Netns, NetnsError};

/// `tproxy-cni redirect` arguments.
#[derive(Debug, Clone, Args)]
#[command(override_usage = "tproxy-cni redirect [OPTIONS] <CONSUL FLAGS | KUMA FLAGS>")]
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

    #[command(flatten)]
    pub kuma: KumaFlags,
}

/// Consul's redirect, flag for flag as `consul connect redirect-traffic` takes it (with two dashes).
#[derive(Debug, Clone, Args)]
#[group(id = "consul", multiple = true, conflicts_with = "kuma")]
#[command(next_help_heading = "Consul (as consul connect redirect-traffic)")]
pub struct ConsulFlags {
    /// The proxy's user, a UID or a user name: its traffic is never redirected.
    #[arg(long, value_name = "USER", value_parser = User::parse)]
    pub proxy_uid: Option<User>,

    /// The proxy's inbound listener port [default: 20000].
    #[arg(long, value_name = "PORT", value_parser = port, conflicts_with = "consul_config")]
    pub proxy_inbound_port: Option<Port>,

    /// The proxy's outbound listener port [default: 15001].
    #[arg(long, value_name = "PORT", value_parser = port, conflicts_with = "consul_config")]
    pub proxy_outbound_port: Option<Port>,

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

/// Kuma's redirect, flag for flag as `kumactl install transparent-proxy` takes it. Flags override
/// `--kuma-config`, as in kumactl.
#[derive(Debug, Clone, Args)]
#[group(id = "kuma", multiple = true)]
#[command(next_help_heading = "Kuma (as kumactl install transparent-proxy)")]
pub struct KumaFlags {
    /// The user kuma-dp runs as, a UID or a user name [default: UID 5678]: its traffic is never
    /// redirected.
    #[arg(long, visible_alias = "kuma-dp-uid", value_name = "USER", value_parser = User::parse)]
    pub kuma_dp_user: Option<User>,

    /// Where inbound TCP is redirected [default: 15006].
    #[arg(long, value_name = "PORT", value_parser = port)]
    pub redirect_inbound_port: Option<Port>,

    /// Where outbound TCP is redirected [default: 15001].
    #[arg(long, value_name = "PORT", value_parser = port)]
    pub redirect_outbound_port: Option<Port>,

    /// Send DNS queries (UDP port 53) to kuma-dp's DNS proxy. kumactl limits this to the servers of
    /// /etc/resolv.conf; tproxy-cni captures every query, as --redirect-all-dns-traffic.
    #[arg(long, conflicts_with = "redirect_all_dns_traffic")]
    pub redirect_dns: bool,

    /// Send every DNS query (UDP port 53) to kuma-dp's DNS proxy.
    #[arg(long)]
    pub redirect_all_dns_traffic: bool,

    /// kuma-dp's DNS proxy port [default: 15053].
    #[arg(long, value_name = "PORT", value_parser = port)]
    pub redirect_dns_port: Option<Port>,

    /// Inbound ports not redirected, comma-separated; repeatable.
    #[arg(long, value_name = "PORTS", value_parser = port, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<Port>,

    /// Outbound ports not redirected, comma-separated; repeatable.
    #[arg(long, value_name = "PORTS", value_parser = port, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<Port>,

    /// Sources (addresses or CIDRs, either family) whose inbound connections are not redirected;
    /// comma-separated, repeatable.
    #[arg(long, value_name = "IPS", value_parser = cidr, value_delimiter = ',')]
    pub exclude_inbound_ips: Vec<IpNet>,

    /// Destinations (addresses or CIDRs, either family) not redirected; comma-separated, repeatable.
    #[arg(long, value_name = "IPS", value_parser = cidr, value_delimiter = ',')]
    pub exclude_outbound_ips: Vec<IpNet>,

    /// Which families are redirected [default: dualstack, when the namespace has IPv6].
    #[arg(long, value_enum, value_name = "MODE")]
    pub ip_family_mode: Option<IpFamilyMode>,

    /// Read Kuma's transparent-proxy configuration (YAML, as kumactl's --config-file takes it and
    /// Kuma's webhook writes it: kumaDPUser, redirect.inbound.excludePorts, …); flags given override
    /// it; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub kuma_config: Option<PathBuf>,
}

/// `--ip-family-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IpFamilyMode {
    Dualstack,
    Ipv4,
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
        source: SettingsError,
    },
    #[error("{from}")]
    Kuma {
        from: String,
        #[source]
        source: TproxyConfigError,
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
    Engine(#[from] EngineError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl RedirectArgs {
    /// Whether the flags name a mesh (Consul's or Kuma's); without one, `redirect` is a usage error.
    pub fn names_a_mesh(&self) -> bool {
        self.consul.given() || self.kuma.given()
    }
}

/// Builds the redirect, checks it against the namespace, and installs it; returns what to print
/// (with `--dry-run`, the transactions instead). `ssh_connection` is the process's
/// `SSH_CONNECTION`, read at the command line's edge.
pub fn run(args: &RedirectArgs, ssh_connection: Option<&str>) -> Result<Report, RedirectError> {
    let ns = args.namespace.open()?;
    let deadline = Deadline::after(DEFAULT_BUDGET);
    let net = PodNetwork { has_ipv6: has_ipv6(&ns).map_err(RedirectError::Interfaces)? };
    let (redirect, source) =
        if args.kuma.given() { kuma_redirect(&args.kuma, net)? } else { consul_redirect(&args.consul, net)? };
    // Everything below up to `apply` only reads: a refusal or a dry run changes nothing.
    let (redirect, address_missing) = netlink::inspect(&ns, redirect, deadline)?;
    let sets = rules::build(&redirect);
    if !args.force {
        ssh_guard(&ns, &redirect, &source, ssh_connection)?;
    }
    let engine = args.namespace.engine(deadline);
    let plan = engine.plan_apply(&ns, &sets)?;
    let where_ = args.namespace.describe();
    if args.dry_run {
        let mut out = plan.render();
        if let (Some(addr), false) = (redirect.ipv6_passthrough_address(), address_missing.is_empty()) {
            out += &format!("# lo: add {addr}/128 (the source of Kuma's IPv6 inbound passthrough)\n");
        }
        return Ok(Report::out(out));
    }
    let mut prepared = netlink::prepare(&ns, redirect, deadline)?;
    let applied = engine.apply(&ns, &sets)?;
    // Kuma's `::6` after the rules, as in ADD: an interrupted command never leaves the address alone.
    if let Err(e) = prepared.add_address(&ns, deadline) {
        engine.undo(&ns, applied);
        return Err(e.into());
    }
    let families: Vec<&str> = sets.iter().map(|s| s.family.name()).collect();
    let verb = if plan.replaces() { "replaced" } else { "installed" };
    let mut report = Report::out(format!(
        "tproxy-cni: {} redirect {verb} in {where_} ({}, {})\n",
        prepared.redirect.mesh(),
        families.join("+"),
        engine.name()
    ));
    remove_the_other_engines(&args.namespace, &ns, &mut report);
    Ok(report)
}

/// After the new redirect is in place, removes the rules of ours the other engine holds (a
/// `redirect` made with the other `--backend`, or before an upgrade changed the default): two
/// copies of the redirect would disagree as soon as their configurations differ — an exclusion of
/// the new one would be redirected by the old one. Best effort: a failure is reported, the new
/// redirect stays. Kuma's `::6` stays too: the new redirect may need it.
fn remove_the_other_engines(namespace: &NamespaceArgs, ns: &Netns, report: &mut Report) {
    let other = namespace.other_engine(Deadline::after(DEFAULT_BUDGET));
    let plan = match other.plan_removal(ns) {
        Ok(plan) if !plan.is_empty() => plan,
        Ok(_) => return,
        Err(e) => {
            log::debug!("{} holds nothing that can be read: {}", other.name(), crate::text::chain(&e));
            return;
        }
    };
    match other.execute(ns, &plan) {
        Ok(()) => {
            report.stdout +=
                &format!("tproxy-cni: removed the earlier rules of {}: {}\n", other.name(), plan.before().join("; "))
        }
        Err(e) => {
            report.stderr += &format!(
                "tproxy-cni: the earlier rules of {} are still there (remove them with uninstall): {}\n",
                other.name(),
                crate::text::chain(&e)
            )
        }
    }
}

/// Where the configuration came from, to point at the right fix in messages.
enum Source {
    ConsulFlags,
    ConsulFile(PathBuf),
    KumaFlags,
    KumaFile(PathBuf),
}

impl Source {
    fn exclude_inbound_port_fix(&self, port: u16) -> String {
        match self {
            Source::ConsulFlags => format!("--exclude-inbound-port {port}"),
            Source::ConsulFile(p) => format!("\"{port}\" in ExcludeInboundPorts of {}", p.display()),
            Source::KumaFlags => format!("--exclude-inbound-ports {port} (or the client with --exclude-inbound-ips)"),
            Source::KumaFile(p) => format!("{port} in redirect.inbound.excludePorts of {}", p.display()),
        }
    }
}

impl ConsulFlags {
    /// Was any Consul flag given?
    fn given(&self) -> bool {
        let f = self;
        f.proxy_uid.is_some()
            || f.proxy_inbound_port.is_some()
            || f.proxy_outbound_port.is_some()
            || !f.exclude_uid.is_empty()
            || !f.exclude_inbound_port.is_empty()
            || !f.exclude_outbound_port.is_empty()
            || !f.exclude_outbound_cidr.is_empty()
            || f.consul_dns_ip.is_some()
            || f.consul_dns_port.is_some()
            || f.dual_stack
            || f.consul_config.is_some()
    }
}

impl KumaFlags {
    /// Was any Kuma flag given?
    fn given(&self) -> bool {
        let f = self;
        f.kuma_dp_user.is_some()
            || f.redirect_inbound_port.is_some()
            || f.redirect_outbound_port.is_some()
            || f.redirect_dns
            || f.redirect_all_dns_traffic
            || f.redirect_dns_port.is_some()
            || !f.exclude_inbound_ports.is_empty()
            || !f.exclude_outbound_ports.is_empty()
            || !f.exclude_inbound_ips.is_empty()
            || !f.exclude_outbound_ips.is_empty()
            || f.ip_family_mode.is_some()
            || f.kuma_config.is_some()
    }
}

/// A list flag given at least once, or `None` (then the file's list, or Kuma's default, stands).
fn given<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// Kuma's redirect from its YAML and/or flags, through the dialect's validation.
fn kuma_redirect(f: &KumaFlags, net: PodNetwork) -> Result<(Redirect, Source), RedirectError> {
    let yaml = f.kuma_config.as_deref().map(read_config).transpose()?;
    let flags = kuma::HostFlags {
        kuma_dp_uid: f
            .kuma_dp_user
            .as_ref()
            .map(User::resolve)
            .transpose()
            .map_err(|source| RedirectError::User { flag: "--kuma-dp-user", source })?,
        redirect_inbound_port: f.redirect_inbound_port,
        redirect_outbound_port: f.redirect_outbound_port,
        redirect_dns: f.redirect_dns,
        redirect_all_dns_traffic: f.redirect_all_dns_traffic,
        redirect_dns_port: f.redirect_dns_port,
        exclude_inbound_ports: given(&f.exclude_inbound_ports),
        exclude_outbound_ports: given(&f.exclude_outbound_ports),
        exclude_inbound_ips: given(&f.exclude_inbound_ips),
        exclude_outbound_ips: given(&f.exclude_outbound_ips),
        dual_stack: f.ip_family_mode.map(|m| m == IpFamilyMode::Dualstack),
    };
    let from = match &f.kuma_config {
        Some(p) => format!("--kuma-config {}", p.display()),
        None => "invalid flags".to_owned(),
    };
    let redirect =
        mesh::kuma_host(yaml.as_deref(), &flags, net).map_err(|source| RedirectError::Kuma { from, source })?;
    // The exclusion goes where the inbound port list comes from (a flag replaces the file's).
    let source = match &f.kuma_config {
        Some(p) if f.exclude_inbound_ports.is_empty() => Source::KumaFile(p.clone()),
        _ => Source::KumaFlags,
    };
    Ok((redirect, source))
}

/// Consul's redirect from flags or from its JSON, through the dialect's one validated constructor.
fn consul_redirect(f: &ConsulFlags, net: PodNetwork) -> Result<(Redirect, Source), RedirectError> {
    if let Some(path) = &f.consul_config {
        let text = read_config(path)?;
        let from = format!("--consul-config {}", path.display());
        let invalid = |source| RedirectError::Consul { from: from.clone(), source };
        let settings = Settings { dual_stack: f.dual_stack, ..consul::parse_config(&text).map_err(invalid)? };
        let spelling = Spelling { dual_stack: CONSUL_FLAGS.dual_stack, ..Spelling::JSON };
        let redirect = mesh::consul_host(settings, &spelling, net).map_err(invalid)?;
        return Ok((redirect, Source::ConsulFile(path.clone())));
    }
    let user_err = |flag| move |source| RedirectError::User { flag, source };
    let mut exclude_outbound_cidrs = Cidrs::default();
    f.exclude_outbound_cidr.iter().for_each(|n| exclude_outbound_cidrs.push(*n));
    let settings = Settings {
        proxy_uid: f.proxy_uid.as_ref().map(User::resolve).transpose().map_err(user_err("--proxy-uid"))?,
        inbound_port: Some(f.proxy_inbound_port.unwrap_or(const { Port::new(consul::DEFAULT_INBOUND_PORT).unwrap() })),
        outbound_port: f.proxy_outbound_port,
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
    let redirect = mesh::consul_host(settings, &CONSUL_FLAGS, net)
        .map_err(|source| RedirectError::Consul { from: "invalid flags".into(), source })?;
    Ok((redirect, Source::ConsulFlags))
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

/// Does the namespace have an IPv6 address besides `::1` (a link-local one counts, as Kuma counts
/// it)? Then it gets an IPv6 pass: otherwise its IPv6 traffic would bypass the proxy. With IPv6 off
/// in the kernel there is no `if_inet6` at all.
fn has_ipv6(ns: &Netns) -> std::io::Result<bool> {
    const LOOPBACK: &str = "00000000000000000000000000000001";
    match ns.read_proc_net("if_inet6") {
        Ok(text) => Ok(text.lines().filter_map(|l| l.split_whitespace().next()).any(|a| a != LOOPBACK)),
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
