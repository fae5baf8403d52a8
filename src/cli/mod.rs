//! The command line, for operators and hosts: everything that is not a CNI call.

mod install;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::mesh::{self, PodNetwork};
use crate::rules;

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
    /// Print the iptables-restore input a pod with these annotations would get, per family.
    ///
    /// The annotations are a JSON object of strings (as in a Pod's metadata.annotations), read
    /// from FILE or stdin. Nothing is applied. Prints nothing when the pod is in no mesh.
    Render {
        /// JSON file with the pod's annotations; `-` or absent reads stdin.
        file: Option<PathBuf>,
        /// Assume the pod has an IPv6 address (its previous plugin's result had one).
        #[arg(long)]
        pod_ipv6: bool,
    },
    Install(Box<install::InstallArgs>),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    crate::log::init(log::LevelFilter::Warn);
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Render { file, pod_ipv6 } => render(file, pod_ipv6),
        Cmd::Install(args) => return install::main(*args),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("tproxy-cni: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn render(file: Option<PathBuf>, pod_ipv6: bool) -> Result<String, String> {
    let text = match file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
    };
    let annotations: BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|e| format!("annotations must be a JSON object of strings: {e}"))?;
    match mesh::classify(&annotations, PodNetwork { has_ipv6: pod_ipv6 }).map_err(|e| e.to_string())? {
        Some(r) => Ok(rules::render_all(&rules::build(&r))),
        None => {
            eprintln!("tproxy-cni: these annotations put the pod in no mesh: nothing would be applied");
            Ok(String::new())
        }
    }
}

fn read_stdin() -> Result<String, String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).map_err(|e| format!("cannot read stdin: {e}"))?;
    Ok(s)
}
