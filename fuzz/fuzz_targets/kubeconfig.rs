//! Kubeconfig text, as the node's `kubeconfig` file holds it.
//!
//! Files it names are looked up beside a kubeconfig in a directory that does not exist; absolute
//! paths are read as the plugin would read them (regular files only, bounded). Beyond "no crash":
//! a refusal's message never carries the user's token, and neither does a loaded config's `Debug`.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tproxy_cni::kube::Kubeconfig;
use tproxy_cni::text::chain;

/// The values of `token` keys in the text (YAML `token: x` or JSON `"token": "x"`), long enough
/// that finding one in a message cannot be chance.
fn tokens(text: &str) -> Vec<String> {
    text.split(['\n', '{', ','])
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            let key = key.trim().trim_matches(['"', '\'']);
            (key == "token").then(|| value.trim().trim_matches(['"', '\'', '}', ' ']).to_owned())
        })
        // A token is one word of base64 or JWT characters; requiring that keeps out texts that
        // happen to equal one of our own messages.
        .filter(|t| t.len() >= 12 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=_.-".contains(&b)))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let secrets = tokens(&text);
    match Kubeconfig::parse(Path::new("/nonexistent/tproxy-cni-fuzz/kubeconfig"), data) {
        Ok(kc) => {
            let shown = format!("{kc:?}");
            for t in &secrets {
                assert!(!shown.contains(t.as_str()), "Debug shows the token: {shown}");
            }
            assert!(kc.server.starts_with("https://") && !kc.server.ends_with('/'));
        }
        Err(problem) => {
            let msg = chain(&problem);
            for t in &secrets {
                assert!(!msg.contains(t.as_str()), "the message carries the token {t:?}: {msg}");
            }
        }
    }
});
