//! `CNI_ARGS`: the runtime's `KEY=VALUE;…` list.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_cni::plugin::args::CniArgs;
use tproxy_cni_fuzz::check_message;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    match CniArgs::parse(raw) {
        Ok(args) => {
            let fields = [
                ("K8S_POD_NAME", &args.pod_name),
                ("K8S_POD_NAMESPACE", &args.pod_namespace),
                ("K8S_POD_UID", &args.pod_uid),
                ("K8S_POD_INFRA_CONTAINER_ID", &args.infra_container_id),
                ("CONSUL_IPTABLES_CONFIG", &args.consul_iptables_config),
            ];
            // Every value is a non-empty piece of the input without a separator, and writing the
            // known keys back gives the same arguments.
            let mut again = Vec::new();
            for (key, value) in fields {
                if let Some(v) = value {
                    assert!(!v.is_empty() && !v.contains(';') && raw.contains(v.as_str()), "{key}={v:?}");
                    again.push(format!("{key}={v}"));
                }
            }
            assert_eq!(CniArgs::parse(&again.join(";")), Ok(args));
        }
        Err(e) => check_message(&e.to_string()),
    }
});
