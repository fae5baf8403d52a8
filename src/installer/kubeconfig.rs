//! The plugin's kubeconfig and the copy of the service-account token it reads.
//!
//! The plugin runs on the host, outside any pod, so it cannot see the installer's projected token.
//! The installer copies the token next to the kubeconfig (both mode 0600, written atomically) and
//! points the kubeconfig's `tokenFile` at the copy. Kubelet rotates the projected token by swapping
//! the volume's `..data` symlink; the installer watches the directory and rewrites the copy whenever
//! the token changes, so the plugin always reads a current one. The cluster CA is embedded.
//!
//! The kubeconfig is written as JSON: every kubeconfig reader accepts it (JSON is YAML), and so does
//! a reader that only knows JSON.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::json;
use thiserror::Error;

use super::atomic;

/// The kubeconfig's file name in the CNI conf dir. It has no `.conf`/`.conflist`/`.json` suffix, so
/// runtimes never take it for a network configuration, and it sorts last.
pub const KUBECONFIG_NAME: &str = "ZZZ-tproxy-cni-kubeconfig";
/// The token copy's file name in the CNI conf dir.
pub const TOKEN_NAME: &str = "ZZZ-tproxy-cni-token";

/// Why the plugin's credentials (the token copy and the kubeconfig naming it) cannot be brought up
/// to date. (A kubeconfig the plugin cannot *read* is a [`crate::kube::KubeconfigError`].)
#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("cannot read the service-account {what} {path} (is a token mounted into the installer pod?)")]
    ServiceAccount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the service-account token {0} is empty")]
    EmptyToken(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the plugin's credentials come from and go to.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The API server URL as reachable from the host network namespace.
    pub server: String,
    /// The projected service-account volume (`token`, `ca.crt`).
    pub service_account_dir: PathBuf,
    /// The kubeconfig we write.
    pub kubeconfig: PathBuf,
    /// The token copy we write.
    pub token: PathBuf,
    /// The token copy's path as the plugin sees it on the host (what `tokenFile` names).
    pub host_token: PathBuf,
}

/// What [`Credentials::sync`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    pub token: bool,
    pub kubeconfig: bool,
}

impl Credentials {
    /// Brings the token copy and the kubeconfig up to date, writing only what differs.
    /// `before_create` runs before each file is first created (to record it in the undo log).
    pub fn sync(&self, mut before_create: impl FnMut(&Path) -> io::Result<()>) -> Result<Synced, CredentialsError> {
        let sa = |name: &str, what| {
            let path = self.service_account_dir.join(name);
            fs::read(&path).map_err(|source| CredentialsError::ServiceAccount { what, path, source })
        };
        let token = sa("token", "token")?;
        if token.iter().all(u8::is_ascii_whitespace) {
            return Err(CredentialsError::EmptyToken(self.service_account_dir.join("token")));
        }
        let ca = sa("ca.crt", "CA certificate")?;
        let kubeconfig = render(&self.server, &ca, &self.host_token);
        let token_changed = self.put(&self.token, &token, &mut before_create)?;
        let kubeconfig_changed = self.put(&self.kubeconfig, &kubeconfig, &mut before_create)?;
        Ok(Synced { token: token_changed, kubeconfig: kubeconfig_changed })
    }

    /// Are both files in place with the content the service account calls for?
    pub fn in_place(&self) -> bool {
        let (Ok(token), Ok(ca)) =
            (fs::read(self.service_account_dir.join("token")), fs::read(self.service_account_dir.join("ca.crt")))
        else {
            return false;
        };
        fs::read(&self.token).is_ok_and(|t| t == token)
            && fs::read(&self.kubeconfig).is_ok_and(|k| k == render(&self.server, &ca, &self.host_token))
    }

    fn put(
        &self,
        path: &Path,
        bytes: &[u8],
        before_create: &mut impl FnMut(&Path) -> io::Result<()>,
    ) -> Result<bool, CredentialsError> {
        let werr = |source| CredentialsError::Write { path: path.to_path_buf(), source };
        if atomic::read_optional(path).map_err(werr)?.as_deref() == Some(bytes) {
            return Ok(false);
        }
        before_create(path).map_err(werr)?;
        atomic::write(path, bytes, 0o600).map_err(werr)?;
        Ok(true)
    }
}

/// The kubeconfig document.
pub fn render(server: &str, ca: &[u8], token_file: &Path) -> Vec<u8> {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": base64(ca)}}],
        "users": [{"name": "tproxy-cni", "user": {"tokenFile": token_file}}],
        "contexts": [{"name": "tproxy-cni", "context": {"cluster": "local", "user": "tproxy-cni"}}],
        "current-context": "tproxy-cni",
    });
    let mut out = serde_json::to_vec_pretty(&doc).expect("always serialises");
    out.push(b'\n');
    out
}

/// The API server URL for `host` and `port`, bracketing an IPv6 address.
pub fn server_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// Standard base64 with padding (RFC 4648 §4), for `certificate-authority-data`.
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    /// The plugin's own kubeconfig loader accepts what the installer writes, CA and token file included.
    #[test]
    fn the_plugin_loads_the_kubeconfig_we_write() {
        let d = TestDir::new("kc-load");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap().pem();
        let token = d.join(TOKEN_NAME);
        fs::write(&token, "the-token").unwrap();
        let path = d.join(KUBECONFIG_NAME);
        fs::write(&path, render("https://[fd00::1]:6443", ca.as_bytes(), &token)).unwrap();
        let k = crate::kube::Kubeconfig::load(&path).unwrap();
        assert_eq!(k.server, "https://[fd00::1]:6443");
        assert!(matches!(&k.token, crate::kube::kubeconfig::TokenSource::File { path, .. } if *path == token));
        assert_eq!(k.token.current().unwrap().unwrap().expose(), "the-token");
    }

    #[test]
    fn server_urls_bracket_ipv6() {
        assert_eq!(server_url("10.96.0.1", 443), "https://10.96.0.1:443");
        assert_eq!(server_url("fd00::1", 443), "https://[fd00::1]:443");
    }

    #[test]
    fn writes_0600_files_and_follows_the_token() {
        let d = TestDir::new("kc");
        fs::create_dir_all(d.join("sa")).unwrap();
        fs::create_dir_all(d.join("net.d")).unwrap();
        fs::write(d.join("sa/token"), b"t1").unwrap();
        fs::write(d.join("sa/ca.crt"), b"CA").unwrap();
        let c = Credentials {
            server: "https://10.0.0.1:6443".into(),
            service_account_dir: d.join("sa"),
            kubeconfig: d.join("net.d").join(KUBECONFIG_NAME),
            token: d.join("net.d").join(TOKEN_NAME),
            host_token: PathBuf::from("/etc/cni/net.d").join(TOKEN_NAME),
        };
        let mut created = Vec::new();
        assert_eq!(
            c.sync(|p| {
                created.push(p.to_path_buf());
                Ok(())
            })
            .unwrap(),
            Synced { token: true, kubeconfig: true }
        );
        assert_eq!(created, [c.token.clone(), c.kubeconfig.clone()]);
        assert!(c.in_place());
        for p in [&c.token, &c.kubeconfig] {
            assert_eq!(fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let kc: serde_json::Value = serde_json::from_slice(&fs::read(&c.kubeconfig).unwrap()).unwrap();
        assert_eq!(kc["users"][0]["user"]["tokenFile"], "/etc/cni/net.d/ZZZ-tproxy-cni-token", "the host's path");
        assert_eq!(kc["clusters"][0]["cluster"]["certificate-authority-data"], "Q0E=");
        assert_eq!(c.sync(|_| Ok(())).unwrap(), Synced::default(), "nothing to rewrite");
        fs::write(d.join("sa/token"), b"t2").unwrap();
        assert!(!c.in_place());
        assert_eq!(c.sync(|_| Ok(())).unwrap(), Synced { token: true, kubeconfig: false });
        assert_eq!(fs::read(&c.token).unwrap(), b"t2");
        fs::write(d.join("sa/token"), b" \n").unwrap();
        assert!(matches!(c.sync(|_| Ok(())), Err(CredentialsError::EmptyToken(_))));
    }
}
