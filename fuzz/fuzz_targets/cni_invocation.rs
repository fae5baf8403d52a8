//! The whole plugin as a runtime calls it: `CNI_*` environment and the network configuration on
//! stdin, through `tproxy_cni::plugin::run`.
//!
//! The input is NUL-separated `CNI_*=value` records, then an empty record (two NULs), then stdin.
//! So that fuzzing touches nothing on the machine, the harness fixes what would reach outside the
//! process: `CNI_NETNS` always names a path that does not exist, and a JSON configuration loses
//! `log_file`, `kubeconfig` and `cni_net_dir` (no file is written, no API server is called) and gets
//! `iptables_mode: nft` when it asks for `auto` (no probe of the host's tables).
//!
//! Invariants: exactly one JSON document (or nothing, where the spec says so) on stdout; a failure
//! is an error document with one of our documented codes — never 199, a panic — and a one-line
//! message; DEL of a namespace that is gone succeeds unless the environment or the configuration's
//! syntax is broken; and the redirect a configuration asks for passes the allow-list.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tproxy_cni::core::mesh::PodNetwork;
use tproxy_cni::plugin::args::CniArgs;
use tproxy_cni::plugin::config::NetConf;
use tproxy_cni::plugin::pod::{self, Api};
use tproxy_cni::plugin::{self, result};
use tproxy_cni_fuzz::{check_message, check_outcome, records};

const GONE_NETNS: &str = "/nonexistent/tproxy-cni-fuzz/netns";
const CODES: [u64; 13] = [1, 2, 3, 4, 5, 6, 7, 11, 50, 100, 101, 102, 103];

fn sanitize(stdin: &[u8]) -> Vec<u8> {
    let Ok(Value::Object(mut conf)) = serde_json::from_slice::<Value>(stdin) else { return stdin.to_vec() };
    for key in ["log_file", "kubeconfig", "cni_net_dir"] {
        conf.remove(key);
    }
    match conf.get("iptables_mode") {
        None => drop(conf.insert("iptables_mode".into(), "nft".into())),
        Some(Value::String(m)) if m.is_empty() || m == "auto" => {
            conf.insert("iptables_mode".into(), "nft".into());
        }
        _ => {}
    }
    serde_json::to_vec(&Value::Object(conf)).expect("a JSON value serialises")
}

fuzz_target!(|data: &[u8]| {
    let (env_part, stdin) = match data.windows(2).position(|w| w == [0, 0]) {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut env: HashMap<String, String> =
        records(env_part).into_iter().filter(|(k, _)| k.starts_with("CNI_") && k != "CNI_NETNS").collect();
    env.insert("CNI_NETNS".into(), GONE_NETNS.into());
    let stdin = sanitize(stdin);
    let command = env.get("CNI_COMMAND").cloned().unwrap_or_default();

    let out = plugin::run(&env, &stdin);
    if out.exit_code == 0 {
        if !out.stdout.is_empty() {
            let doc: Value = serde_json::from_str(&out.stdout).expect("stdout is one JSON document");
            assert!(doc.get("cniVersion").is_some(), "{doc}");
        }
    } else {
        assert_eq!(out.exit_code, 1);
        let doc: Value = serde_json::from_str(&out.stdout).expect("an error is one JSON document");
        let code = doc["code"].as_u64().expect("a numeric code");
        assert!(CODES.contains(&code), "code {code} ({doc})");
        check_message(doc["msg"].as_str().expect("a message"));
        if command == "DEL" {
            assert!(matches!(code, 1 | 4 | 6), "DEL of a gone namespace failed: {doc}");
        }
    }

    // The redirect this configuration and these arguments ask for, as ADD would build it.
    let (Ok(conf), Ok(args)) =
        (NetConf::parse(&stdin), CniArgs::parse(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default()))
    else {
        return;
    };
    let api = Api::new(&conf);
    if let Ok(found) = pod::lookup(&conf, &args, &api) {
        let has_ipv6 = result::has_ipv6(conf.prev_result.as_deref());
        check_outcome(&found.redirect(PodNetwork { has_ipv6 }));
    }
});
