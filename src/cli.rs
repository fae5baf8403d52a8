//! The command line, for operators and hosts: everything that is not a CNI call.
//!
//! `render` prints what a pod would get; `redirect`, `uninstall` and `validate` are the host
//! product ([`crate::host`]); `install` is the installer DaemonSet's long-running command
//! ([`crate::installer::cli`]). This is the edge: the environment is read here, once, and errors
//! become exit statuses here.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use thiserror::Error;

use crate::core::mesh::{self, AnnotationError, PodNetwork};
use crate::core::nft;
use crate::core::redirect::Family;
use crate::core::rules;
use crate::host::namespace::BackendArg;
use crate::host::{Report, redirect, uninstall, validate};
use crate::installer::cli as install;
use crate::text::chain;

/// tproxy-cni installs a service mesh's transparent-proxy redirect in a pod's network namespace.
///
/// Run by a container runtime as a chained CNI plugin (CNI_COMMAND set), it reads the pod's mesh
/// annotations and applies the redirect. Run by hand, it offers the commands below.
#[derive(Debug, Parser)]
#[command(name = "tproxy-cni", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the rules a pod with these annotations would get: the `nft -f` script of the
    /// nftables engine's batch, or with `--backend iptables` the iptables-restore input per family.
    ///
    /// The annotations are a JSON object of strings (as in a Pod's metadata.annotations), read
    /// from FILE or stdin. Nothing is applied. Prints nothing when the pod is in no mesh.
    Render {
        /// JSON file with the pod's annotations; `-` or absent reads stdin.
        file: Option<PathBuf>,
        /// Assume the pod has an IPv6 address (its previous plugin's result had one).
        #[arg(long)]
        pod_ipv6: bool,
        /// The engine whose rules to print.
        #[arg(long, value_enum, value_name = "ENGINE", default_value = "nftables")]
        backend: BackendArg,
    },
    /// Install a mesh's transparent-proxy redirect on this host (or in --netns).
    ///
    /// Takes the flags of `consul connect redirect-traffic` (with two dashes) or consul's redirect
    /// JSON, or the flags of `kumactl install transparent-proxy` or Kuma's YAML; the flags given say
    /// which mesh. The rules are the ones the CNI plugin installs for a pod with the same configuration,
    /// applied in one transaction, replacing any of ours already there. Refuses to cut an SSH
    /// session in the namespace unless its port is excluded or --force is given. Exit status: 0
    /// installed (or printed, with --dry-run), 1 refused or failed (nothing changed), 2 bad usage.
    Redirect(Box<redirect::RedirectArgs>),
    /// Remove every rule and chain tproxy-cni installed (on this host, or in --netns).
    ///
    /// Foreign rules stay. Refuses, changing nothing, when tproxy-cni's chain names hold rules
    /// without its ownership comment (installed by the mesh's own tool). Exit status: 0 removed
    /// (or nothing to remove, or printed with --dry-run), 1 refused or failed, 2 bad usage.
    Uninstall(uninstall::UninstallArgs),
    /// Prove with real traffic that the redirect is in place; the exit status says what failed.
    ///
    /// Listens on the proxy's outbound port, dials --target with a random token and checks, through
    /// SO_ORIGINAL_DST, that the connection was redirected there. Runs unprivileged; run it before
    /// the proxy starts, as a user the redirect captures (not the proxy's, not an excluded one).
    /// Exit status: 0 the redirect is in place, 1 validate could not run, 2 bad usage, 3 redirect
    /// missing, 4 timed out (most likely missing), 5 cannot listen on the port, 6 no route to the
    /// target (nothing tested).
    Validate(validate::ValidateArgs),
    Install(Box<install::InstallArgs>),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    crate::log::init(log::LevelFilter::Warn);
    let cli = Cli::parse();
    // The rest of the environment, read once here (clap has read the flags' fallbacks).
    let ssh_connection = std::env::var("SSH_CONNECTION").ok();
    let result = match cli.command {
        Cmd::Render { file, pod_ipv6, backend } => render(file, pod_ipv6, backend),
        Cmd::Redirect(args) => {
            if !args.names_a_mesh() {
                mesh_missing().exit();
            }
            return host_command(redirect::run(&args, ssh_connection.as_deref()));
        }
        Cmd::Uninstall(args) => return host_command(uninstall::run(&args)),
        Cmd::Validate(args) => return validate_command(&args),
        Cmd::Install(args) => return install::main(*args),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tproxy-cni: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The usage error when `redirect` is given no mesh's flag (the flags given say which mesh it is),
/// reported as clap reports its own.
fn mesh_missing() -> clap::Error {
    let mut cli = Cli::command();
    let redirect = cli.find_subcommand_mut("redirect").expect("the redirect subcommand exists");
    redirect.error(
        clap::error::ErrorKind::MissingRequiredArgument,
        "say which mesh: give Consul's flags (--proxy-uid USER, or --consul-config FILE) or Kuma's \
         (--kuma-dp-user USER, or --kuma-config FILE)",
    )
}

/// `redirect` and `uninstall`: print their report, or the error's whole chain on one line.
fn host_command<E: std::error::Error>(result: Result<Report, E>) -> ExitCode {
    match result {
        Ok(report) => {
            print!("{}", report.stdout);
            eprint!("{}", report.stderr);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tproxy-cni: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn validate_command(args: &validate::ValidateArgs) -> ExitCode {
    match validate::run(args) {
        Ok(report) => {
            print!("{report}");
            println!("tproxy-cni validate: the redirect is in place");
            ExitCode::from(validate::EXIT_OK)
        }
        Err(e) => {
            eprintln!("tproxy-cni validate: {}", chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Why `render` printed nothing.
#[derive(Debug, Error)]
enum RenderError {
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read stdin")]
    Stdin(#[source] io::Error),
    #[error("annotations must be a JSON object of strings")]
    Json(#[source] serde_json::Error),
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
}

fn render(file: Option<PathBuf>, pod_ipv6: bool, backend: BackendArg) -> Result<String, RenderError> {
    let text = match file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => std::fs::read_to_string(p).map_err(|source| RenderError::Read { path: p.to_owned(), source })?,
    };
    let annotations: BTreeMap<String, String> = serde_json::from_str(&text).map_err(RenderError::Json)?;
    match mesh::classify(&annotations, PodNetwork { has_ipv6: pod_ipv6 })? {
        Some(r) => Ok(match backend {
            BackendArg::Iptables => rules::render_all(&rules::build(&r)),
            BackendArg::Nftables => nft::render::script(&nft::from_rules(&rules::build(&r)), &Family::ALL),
        }),
        None => {
            eprintln!("tproxy-cni: these annotations put the pod in no mesh: nothing would be applied");
            Ok(String::new())
        }
    }
}

fn read_stdin() -> Result<String, RenderError> {
    let mut s = String::new();
    io::stdin().read_to_string(&mut s).map_err(RenderError::Stdin)?;
    Ok(s)
}
