//! Kubeconfig files: which API server, which certificate authority, which credentials.
//!
//! [`Kubeconfig::load`] reads the file once and resolves the current context into a server URL, a
//! trust anchor, an optional client certificate and a token source, with every file it names
//! read and checked up front (so a bad certificate is a clear error here, never a surprise during
//! a request). Relative file names are resolved against the kubeconfig's directory, as kubectl does.
//!
//! The token is the exception: a `tokenFile` is re-read for every request, so a projected service
//! account token that the kubelet rotates keeps working in a long-lived process too. When both
//! `token` and `tokenFile` are set the file wins, as in client-go.
//!
//! Only what a node component needs is supported. Exec plugins, auth providers, basic auth,
//! impersonation, `proxy-url` and `tls-server-name` are refused with a message saying so, rather
//! than silently ignored.

use std::fs;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::error::{KubeconfigError, Problem};

/// A bearer token. Its `Debug` never shows the value and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token, refusing what could not travel in an HTTP header.
    pub fn new(token: &str) -> Result<Secret, &'static str> {
        let token = token.trim();
        if token.is_empty() {
            return Err("is empty");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("has characters that cannot be sent in an HTTP header");
        }
        Ok(Secret(token.to_owned()))
    }

    /// The token itself, for the `Authorization` header and for scrubbing messages.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Against these certificate authorities (`certificate-authority` or `-data`).
    Authorities(Vec<CertificateDer<'static>>),
    /// No CA in the kubeconfig: against the well-known public roots.
    PublicRoots,
    /// `insecure-skip-tls-verify: true`: not at all.
    Insecure,
}

/// A client certificate chain and its private key, checked to belong together.
#[derive(Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    /// The key, in the form the HTTP client takes (its `Debug` shows no key material).
    pub key: ureq::tls::PrivateKey<'static>,
}

/// Where the bearer token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No token (client certificate only, or anonymous).
    None,
    /// `token`, inline in the kubeconfig.
    Inline(Secret),
    /// `tokenFile`, read again for every request; the inline token, if any, is used only when the
    /// file cannot be read.
    File { path: PathBuf, inline: Option<Secret> },
}

impl TokenSource {
    /// The token to send now. A `tokenFile` is read each time.
    pub fn current(&self) -> Result<Option<Secret>, Problem> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Inline(s) => Ok(Some(s.clone())),
            TokenSource::File { path, inline } => match read_bounded(path).and_then(|b| {
                String::from_utf8(b).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
            }) {
                Ok(text) => {
                    Secret::new(&text).map(Some).map_err(|reason| Problem::TokenFile { file: path.clone(), reason })
                }
                Err(e) => match inline {
                    Some(s) => {
                        log::warn!("cannot read user token file {}: {e}; using the inline token", path.display());
                        Ok(Some(s.clone()))
                    }
                    None => Err(Problem::File { what: "user tokenFile", file: path.clone(), source: e }),
                },
            },
        }
    }
}

/// The current context of a kubeconfig, resolved and checked.
#[derive(Debug)]
pub struct Kubeconfig {
    /// The file it was read from.
    pub path: PathBuf,
    /// The API server's base URL (`https://host:port` plus any path prefix, no trailing slash).
    pub server: String,
    pub trust: Trust,
    pub client_cert: Option<ClientCert>,
    pub token: TokenSource,
}

/// Finds the kubeconfig to read for the configured `path`, the way consul-cni does: the file
/// itself when it exists; otherwise (missing, or a directory) the most recently modified regular
/// file beside it whose name is `<file name>-<anything>` (a versioned copy written by an installer).
pub fn resolve_path(path: &Path) -> Result<PathBuf, KubeconfigError> {
    let fail = |problem| KubeconfigError { path: path.to_owned(), problem };
    match fs::metadata(path) {
        Ok(m) if m.is_file() => return Ok(path.to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(Problem::Read(e))),
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(fail(Problem::Missing));
    };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{name}-");
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(fail(Problem::Missing)),
        Err(e) => return Err(fail(Problem::Read(e))),
    };
    let mut newest: Option<(SystemTime, String)> = None;
    for entry in entries.flatten() {
        let Ok(file_name) = entry.file_name().into_string() else { continue };
        if !file_name.starts_with(&prefix) {
            continue;
        }
        // Follow symlinks, as reading the file would.
        let Ok(meta) = fs::metadata(entry.path()) else { continue };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        // Ties go to the lexically greatest name, so the choice never depends on directory order.
        let candidate = (modified, file_name);
        if newest.as_ref().is_none_or(|best| candidate > *best) {
            newest = Some(candidate);
        }
    }
    match newest {
        Some((_, file_name)) => {
            let chosen = dir.join(file_name);
            log::debug!(
                "kubeconfig {} is not a file: using the newest versioned copy {}",
                path.display(),
                chosen.display()
            );
            Ok(chosen)
        }
        None => Err(fail(Problem::Missing)),
    }
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(rename = "current-context", default)]
    current_context: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    clusters: Vec<NamedCluster>,
    #[serde(default, deserialize_with = "null_default")]
    contexts: Vec<NamedContext>,
    #[serde(default, deserialize_with = "null_default")]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    cluster: RawCluster,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    context: RawContext,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    user: RawUser,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct RawCluster {
    server: Option<String>,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    tls_server_name: Option<String>,
    proxy_url: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawContext {
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    user: String,
}

/// Secret-bearing fields are read as untyped YAML values, so that a mistyped one can never be
/// echoed by a deserializer's "invalid type" message.
#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct RawUser {
    token: Option<serde_json::Value>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<serde_json::Value>,
    username: Option<serde_json::Value>,
    password: Option<serde_json::Value>,
    exec: Option<serde_json::Value>,
    auth_provider: Option<serde_json::Value>,
    #[serde(rename = "as")]
    impersonate: Option<serde_json::Value>,
}

fn null_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An unset or empty string field is absent, as in client-go.
fn set(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

fn secret_text(v: Option<serde_json::Value>, what: &'static str) -> Result<Option<String>, &'static str> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(what),
    }
}

impl Kubeconfig {
    /// Reads the kubeconfig at `path` (which [`resolve_path`] has found) and resolves its current context.
    pub fn load(path: &Path) -> Result<Kubeconfig, KubeconfigError> {
        let text =
            read_bounded(path).map_err(|e| KubeconfigError { path: path.to_owned(), problem: Problem::Read(e) })?;
        Kubeconfig::parse(path, &text).map_err(|problem| KubeconfigError { path: path.to_owned(), problem })
    }

    /// Resolves the current context of kubeconfig text; `path` locates relative file names.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Kubeconfig, Problem> {
        // Check the shape first: a decoder's "invalid type" message quotes the value it got, and a
        // file that is one bare string (a token file named by mistake) must not be echoed.
        // No source snippet in errors: it would quote the lines around the error, token included.
        let options = serde_saphyr::options! { with_snippet: false };
        let doc: serde_json::Value =
            serde_saphyr::from_slice_with_options(text, options).map_err(|e| Problem::Yaml(Box::new(e)))?;
        if !doc.is_object() {
            return Err(Problem::NotAMapping);
        }
        let raw: RawConfig =
            serde_json::from_value(doc).map_err(|e| Problem::Shape(without_quoted_values(&e.to_string())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let context_name = set(raw.current_context).ok_or(Problem::NoCurrentContext)?;
        let context = raw
            .contexts
            .into_iter()
            .find(|c| c.name == context_name)
            .ok_or_else(|| Problem::NoContext(excerpt(&context_name)))?
            .context;
        let cluster = raw
            .clusters
            .into_iter()
            .find(|c| c.name == context.cluster)
            .ok_or_else(|| Problem::NoCluster { context: excerpt(&context_name), cluster: excerpt(&context.cluster) })?
            .cluster;
        // A context without a user is anonymous; one that names a user must find it.
        let user = if context.user.is_empty() {
            RawUser::default()
        } else {
            raw.users
                .into_iter()
                .find(|u| u.name == context.user)
                .ok_or_else(|| Problem::NoUser { context: excerpt(&context_name), user: excerpt(&context.user) })?
                .user
        };

        let server = set(cluster.server).ok_or(Problem::Server { url: String::new(), reason: "is missing" })?;
        let server = parse_server(&server).map_err(|reason| Problem::Server { url: excerpt(&server), reason })?;
        if set(cluster.proxy_url).is_some() {
            return Err(Problem::Unsupported {
                what: "cluster proxy-url",
                hint: "the node must reach the API server directly",
            });
        }
        if set(cluster.tls_server_name).is_some() {
            return Err(Problem::Unsupported {
                what: "cluster tls-server-name",
                hint: "use a server URL whose host the API server's certificate names",
            });
        }
        let trust = trust(
            cluster.certificate_authority,
            cluster.certificate_authority_data,
            cluster.insecure_skip_tls_verify,
            base,
        )?;

        if user.exec.is_some() || user.auth_provider.is_some() {
            return Err(Problem::Unsupported {
                what: "user exec and auth-provider credentials",
                hint: "give the user a token, a tokenFile or a client certificate",
            });
        }
        if user.username.is_some() || user.password.is_some() {
            return Err(Problem::Unsupported {
                what: "user username/password (basic auth)",
                hint: "give the user a token, a tokenFile or a client certificate",
            });
        }
        if user.impersonate.is_some() {
            return Err(Problem::Unsupported { what: "user impersonation (as)", hint: "remove it" });
        }
        let client_cert = client_cert(&user, base)?;
        let inline = secret_text(user.token, "must be a string")
            .map_err(Problem::Token)?
            .map(|t| Secret::new(&t).map_err(Problem::Token))
            .transpose()?;
        let token = match (set(user.token_file), inline) {
            (Some(file), inline) => TokenSource::File { path: base.join(file), inline },
            (None, Some(s)) => TokenSource::Inline(s),
            (None, None) => TokenSource::None,
        };
        Ok(Kubeconfig { path: path.to_owned(), server, trust, client_cert, token })
    }
}

impl Kubeconfig {
    /// The configuration of a process running in a pod, from its service account: the API server
    /// at `host`:`port` (what `KUBERNETES_SERVICE_HOST` / `_PORT` say; the caller reads the
    /// environment), `ca.crt` as the CA and `token` as a token file re-read per request, both in
    /// `account_dir` (normally `/var/run/secrets/kubernetes.io/serviceaccount`).
    pub fn in_cluster(host: &str, port: &str, account_dir: &Path) -> Result<Kubeconfig, KubeconfigError> {
        let fail = |problem| KubeconfigError { path: account_dir.to_owned(), problem };
        let host = host.trim();
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let url = format!("https://{authority}");
        let server = parse_server(&url).map_err(|reason| fail(Problem::Server { url: excerpt(&url), reason }))?;
        let ca = read_file(account_dir, "ca.crt", "service account ca.crt").map_err(fail)?;
        let trust = Trust::Authorities(certificates(&ca, "service account ca.crt").map_err(fail)?);
        let token = TokenSource::File { path: account_dir.join("token"), inline: None };
        // Fail now, not on the first request, if the token cannot be read.
        token.current().map_err(fail)?;
        Ok(Kubeconfig { path: account_dir.to_owned(), server, trust, client_cert: None, token })
    }
}

/// What of a refused value (a `server`, a context, cluster or user name) a message may quote: its
/// first word, at most 80 characters. A URL has no space, nor, in practice, does a name; a value
/// that does is a broken document whose scalar ran on into other keys — possibly the user's
/// token — which must never reach a log.
fn excerpt(server: &str) -> String {
    let word = server.split(|c: char| c.is_whitespace() || c.is_control()).find(|w| !w.is_empty()).unwrap_or("");
    match word.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &word[..cut]),
        None if word.len() < server.trim().len() => format!("{word}…"),
        None => word.to_owned(),
    }
}

/// Checks a cluster `server` and returns it without a trailing slash. Only `https://` is accepted:
/// a node credential must never travel in clear text.
pub fn parse_server(url: &str) -> Result<String, &'static str> {
    let url = url.trim();
    let scheme_len = "https://".len();
    // `get`, not indexing: the eighth byte may fall inside a multi-byte character.
    if !url.get(..scheme_len).is_some_and(|s| s.eq_ignore_ascii_case("https://")) {
        return Err("only https:// servers are supported");
    }
    let rest = &url[scheme_len..];
    if rest.contains(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#') {
        return Err("has a space, a query or a fragment");
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        return Err("must not carry user information");
    }
    let port = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("has an unclosed [ in its host")?;
        addr.parse::<Ipv6Addr>().map_err(|_| "has a bracketed host that is not an IPv6 address")?;
        match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("has garbage after its IPv6 host")?),
        }
    } else {
        if authority.matches(':').count() > 1 {
            return Err("has an IPv6 host without [brackets]");
        }
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err("has no host");
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
            return Err("has a host that is neither a DNS name nor an IP address (IPv6 needs [brackets])");
        }
        port
    };
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err("has a port that is not a number from 1 to 65535"),
        }
    }
    Ok(format!("https://{authority}{}", path.trim_end_matches('/')))
}

fn trust(file: Option<String>, data: Option<String>, insecure: bool, base: &Path) -> Result<Trust, Problem> {
    let pem = match (set(file), set(data)) {
        (Some(_), Some(_)) => return Err(Problem::Both("certificate-authority", "certificate-authority-data")),
        (Some(f), None) => Some(read_file(base, &f, "certificate-authority")?),
        (None, Some(d)) => Some(decode(&d, "certificate-authority-data")?),
        (None, None) => None,
    };
    match (pem, insecure) {
        (Some(_), true) => Err(Problem::Both("a certificate authority", "insecure-skip-tls-verify")),
        (Some(pem), false) => Ok(Trust::Authorities(certificates(&pem, "certificate authority")?)),
        (None, true) => Ok(Trust::Insecure),
        (None, false) => Ok(Trust::PublicRoots),
    }
}

fn client_cert(user: &RawUser, base: &Path) -> Result<Option<ClientCert>, Problem> {
    let cert = match (set(user.client_certificate.clone()), set(user.client_certificate_data.clone())) {
        (Some(_), Some(_)) => return Err(Problem::Both("client-certificate", "client-certificate-data")),
        (Some(f), None) => Some(read_file(base, &f, "client-certificate")?),
        (None, Some(d)) => Some(decode(&d, "client-certificate-data")?),
        (None, None) => None,
    };
    let key_data = secret_text(user.client_key_data.clone(), "must be a string")
        .map_err(|reason| Problem::Pem { what: "client-key-data", reason })?;
    let key = match (set(user.client_key.clone()), key_data) {
        (Some(_), Some(_)) => return Err(Problem::Both("client-key", "client-key-data")),
        (Some(f), None) => Some(read_file(base, &f, "client-key")?),
        (None, Some(d)) => Some(decode(&d, "client-key-data")?),
        (None, None) => None,
    };
    let (cert, key_pem) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(Problem::HalfClientCert("certificate", "key")),
        (None, Some(_)) => return Err(Problem::HalfClientCert("key", "certificate")),
        (Some(c), Some(k)) => (c, k),
    };
    // A kubelet's client-certificate file often holds the key too, and vice versa: take from each
    // only the sections of the kind it is named for.
    let chain = certificates(&cert, "client certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Problem::Pem {
        what: "client key",
        reason: match e {
            pem::Error::NoItemsFound => "holds no private key",
            _ => "is not valid PEM",
        },
    })?;
    if !matches!(key, PrivateKeyDer::Pkcs1(_) | PrivateKeyDer::Sec1(_) | PrivateKeyDer::Pkcs8(_)) {
        return Err(Problem::Pem { what: "client key", reason: "is of a kind that is not supported" });
    }
    // Refuse here what the TLS library would refuse (or choke on) at connection time.
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(Problem::ClientKey)?;
    // The same first private key of the same PEM, parsed by the HTTP client's own reader.
    let key = ureq::tls::PrivateKey::from_pem(&key_pem)
        .map_err(|_| Problem::Pem { what: "client key", reason: "is not valid PEM" })?;
    Ok(Some(ClientCert { chain, key }))
}

fn read_file(base: &Path, file: &str, what: &'static str) -> Result<Vec<u8>, Problem> {
    let path = base.join(file);
    read_bounded(&path).map_err(|source| Problem::File { what, file: path, source })
}

/// A decoder's message with every double-quoted value left out: `invalid type: string "…",
/// expected …` quotes what it found, and a value in the wrong place may be a token.
fn without_quoted_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in msg.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            _ if !quoted => out.push(c),
            _ => {}
        }
    }
    out.replace(" ,", ",").replace("  ", " ")
}

/// Reads a file a kubeconfig names (or the kubeconfig itself): a regular file of at most
/// [`crate::core::limits::MAX_CONFIG_FILE_BYTES`]. It is opened without blocking, so a FIFO or a device
/// named by mistake is an error at once rather than a plugin that never returns.
pub(crate) fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let limit = crate::core::limits::MAX_CONFIG_FILE_BYTES;
    let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "is not a regular file"));
    }
    let mut data = Vec::new();
    file.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(data)
}

fn decode(data: &str, what: &'static str) -> Result<Vec<u8>, Problem> {
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(compact).map_err(|source| Problem::Base64 { what, source })
}

fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Problem::Pem { what, reason: "is not valid PEM" })?;
    if certs.is_empty() {
        return Err(Problem::Pem { what, reason: "holds no certificate" });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    fn parse(yaml: &str) -> Result<Kubeconfig, Problem> {
        Kubeconfig::parse(Path::new("/etc/cni/net.d/kubeconfig"), yaml.as_bytes())
    }

    fn doc(cluster: &str, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\ncontexts:\n- name: c\n  context: {{cluster: k, user: u}}\n\
             clusters:\n- name: k\n  cluster:\n{cluster}\nusers:\n- name: u\n  user:\n{user}\n"
        )
    }

    #[test]
    fn server_urls_are_checked_and_normalised() {
        assert_eq!(parse_server("https://10.0.0.1:6443/").unwrap(), "https://10.0.0.1:6443");
        assert_eq!(parse_server("https://[fd00::1]:6443").unwrap(), "https://[fd00::1]:6443");
        assert_eq!(
            parse_server("HTTPS://api.example:443/k8s/clusters/c-1/").unwrap(),
            "https://api.example:443/k8s/clusters/c-1"
        );
        assert_eq!(parse_server("https://[::1]").unwrap(), "https://[::1]");
        for (bad, why) in [
            ("http://10.0.0.1", "only https"),
            ("10.0.0.1:6443", "only https"),
            ("https://", "no host"),
            ("https://:6443", "no host"),
            ("https://user:pw@h", "user information"),
            ("https://fd00::1:6443", "without [brackets]"),
            ("https://h_1:6443", "neither a DNS name"),
            ("https://[fd00::1:6443", "unclosed"),
            ("https://[not-v6]:1", "not an IPv6"),
            ("https://h:0", "port"),
            ("https://h:70000", "port"),
            ("https://h/x?y=1", "query"),
            ("https://h name", "space"),
        ] {
            let e = parse_server(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn resolves_the_current_context_with_an_inline_token() {
        let k =
            parse(&doc("    server: https://[fd00::1]:6443\n    insecure-skip-tls-verify: true", "    token: abc.def"))
                .unwrap();
        assert_eq!(k.server, "https://[fd00::1]:6443");
        assert!(matches!(k.trust, Trust::Insecure));
        assert!(matches!(&k.token, TokenSource::Inline(s) if s.expose() == "abc.def"));
        assert!(k.client_cert.is_none());
    }

    #[test]
    fn token_file_wins_and_is_relative_to_the_kubeconfig() {
        let k = parse(&doc("    server: https://h", "    token: inline\n    tokenFile: tproxy-cni/token")).unwrap();
        match k.token {
            TokenSource::File { path, inline } => {
                assert_eq!(path, Path::new("/etc/cni/net.d/tproxy-cni/token"));
                assert!(inline.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(k.trust, Trust::PublicRoots));
    }

    #[test]
    fn secrets_never_show_in_debug_or_errors() {
        let s = Secret::new("s3cr3t-token").unwrap();
        assert!(!format!("{s:?}").contains("s3cr3t"));
        // A token written as a number must not be echoed by the YAML decoder's type error.
        let e = parse(&doc("    server: https://h", "    token: 8675309")).unwrap_err();
        assert!(!e.to_string().contains("8675309"), "{e}");
        let e = parse(&doc("    server: https://h", "    client-key-data: 8675309\n    client-certificate-data: eA=="))
            .unwrap_err();
        assert!(!crate::text::chain(&e).contains("8675309"), "{e}");
        // A broken server scalar that ran on into the user's token (found by fuzzing): the
        // message quotes only the value's first word.
        let e = parse(&doc(
            "    server: \"https:v2 k insecure token: c1VjcpmV0ets/tok1n\"",
            "    token: c1VjcpmV0ets/tok1n",
        ))
        .unwrap_err();
        let msg = crate::text::chain(&e);
        assert!(!msg.contains("c1VjcpmV0ets") && msg.contains("\"https:v2…\""), "{msg}");
        // The same for the names a context refers to.
        let run_on = doc("    server: https://h", "    token: c1VjcpmV0ets/tok1n")
            .replace("current-context: c\n", "current-context: \"c token: c1VjcpmV0ets/tok1n\"\n");
        let msg = crate::text::chain(&parse(&run_on).unwrap_err());
        assert!(!msg.contains("c1VjcpmV0ets") && msg.contains("current-context \"c…\""), "{msg}");
        assert!(Secret::new("a b").is_err() && Secret::new(" \n").is_err());
        assert_eq!(Secret::new(" tok\n").unwrap().expose(), "tok");
    }

    #[test]
    fn refuses_what_it_does_not_support_or_cannot_resolve() {
        let cases: [(String, &str); 9] = [
            ("current-context: ''\n".into(), "no current-context"),
            (doc("    server: https://h", "    exec: {command: x}"), "exec"),
            (doc("    server: https://h", "    username: a\n    password: b"), "basic auth"),
            (doc("    server: https://h\n    proxy-url: http://p:3128", "    token: t"), "proxy-url"),
            (doc("    server: https://h\n    tls-server-name: x", "    token: t"), "tls-server-name"),
            (doc("    server: http://h", "    token: t"), "only https"),
            (doc("    insecure-skip-tls-verify: true", "    token: t"), "is missing"),
            (
                doc(
                    "    server: https://h\n    certificate-authority: ca.crt\n    certificate-authority-data: eA==",
                    "",
                ),
                "both set",
            ),
            (doc("    server: https://h\n    certificate-authority-data: '%%%'", ""), "not valid base64"),
        ];
        for (yaml, want) in cases {
            let e = parse(&yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}\n→ {e}");
        }
        let e = parse("current-context: x\ncontexts: []\n").unwrap_err().to_string();
        assert!(e.contains("\"x\" is not among its contexts"), "{e}");
        let e = parse(&doc("    server: https://h", "    client-certificate-data: eA==")).unwrap_err().to_string();
        assert!(e.contains("client certificate but no client key"), "{e}");
        assert!(matches!(parse("{not yaml"), Err(Problem::Yaml(_))));
        let e = parse("eyJhbGciOiJSUzI1NiJ9.secret-token-text\n").unwrap_err().to_string();
        assert!(e.contains("not a YAML mapping") && !e.contains("secret-token-text"), "{e}");
    }

    #[test]
    fn a_context_without_a_user_is_anonymous() {
        let yaml = "current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\n\
                    clusters: [{name: k, cluster: {server: 'https://h:1'}}]\nusers: null\n";
        let k = parse(yaml).unwrap();
        assert!(matches!(k.token, TokenSource::None) && k.client_cert.is_none());
    }

    #[test]
    fn in_cluster_configuration_comes_from_the_service_account() {
        let dir = TestDir::new("sa");
        let e = Kubeconfig::in_cluster("10.96.0.1", "443", &dir).unwrap_err().to_string();
        assert!(e.contains("ca.crt"), "{e}");
        // A certificate is a certificate: any will do for the loader (rcgen is a dev-dependency).
        let ca = rcgen::generate_simple_self_signed(vec!["kubernetes".to_string()]).unwrap().cert.pem();
        fs::write(dir.join("ca.crt"), ca).unwrap();
        let e = Kubeconfig::in_cluster("10.96.0.1", "443", &dir).unwrap_err().to_string();
        assert!(e.contains("tokenFile"), "{e}");
        fs::write(dir.join("token"), "sa-token\n").unwrap();
        let k = Kubeconfig::in_cluster("10.96.0.1", "443", &dir).unwrap();
        assert_eq!(k.server, "https://10.96.0.1:443");
        assert!(matches!(k.trust, Trust::Authorities(ref c) if c.len() == 1));
        assert_eq!(k.token.current().unwrap().unwrap().expose(), "sa-token");
        assert_eq!(Kubeconfig::in_cluster("fd00::1", "6443", &dir).unwrap().server, "https://[fd00::1]:6443");
    }

    #[test]
    fn falls_back_to_the_newest_versioned_kubeconfig() {
        let dir = TestDir::new("kc");
        let wanted = dir.join("ZZZ-consul-cni-kubeconfig");
        assert!(matches!(resolve_path(&wanted).unwrap_err().problem, Problem::Missing));
        let old = dir.join("ZZZ-consul-cni-kubeconfig-1");
        let new = dir.join("ZZZ-consul-cni-kubeconfig-2");
        fs::write(&new, "new").unwrap();
        fs::write(&old, "old").unwrap();
        fs::write(dir.join("ZZZ-consul-cni-kubeconfigX"), "not versioned").unwrap();
        let past = SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options().write(true).open(&old).unwrap().set_modified(past).unwrap();
        assert_eq!(resolve_path(&wanted).unwrap(), new);
        // A directory where the file should be is passed over too.
        fs::create_dir(&wanted).unwrap();
        assert_eq!(resolve_path(&wanted).unwrap(), new);
        fs::remove_dir(&wanted).unwrap();
        fs::write(&wanted, "stable").unwrap();
        assert_eq!(resolve_path(&wanted).unwrap(), wanted);
    }
}
