//! The host product: the redirect as a command for hosts and VMs (`consul connect
//! redirect-traffic`, `kumactl install transparent-proxy`), through the same core and engine as
//! the plugin.
//!
//! [`redirect`] installs, [`uninstall`] removes, [`validate`] proves with real traffic that the
//! redirect is in place; the SSH guard ([`ssh`]) keeps `redirect` from cutting the operator's own
//! session. Each command is a function of its parsed flags returning a [`Report`]; `crate::cli`
//! prints it and turns errors into exit statuses.

pub mod namespace;
pub mod redirect;
mod ssh;
pub mod uninstall;
mod user;
pub mod validate;

/// What `redirect` and `uninstall` print: the result (with `--dry-run`, the transactions) on
/// stdout, notes for the person on stderr.
#[derive(Debug, Default)]
pub struct Report {
    /// The result, or the transactions a dry run would send.
    pub stdout: String,
    /// Notes for the person running the command.
    pub stderr: String,
}

impl Report {
    fn out(stdout: String) -> Report {
        Report { stdout, stderr: String::new() }
    }
}
