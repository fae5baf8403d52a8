//! The installer's Kubernetes manifests parse as the objects they claim to be, with the properties
//! the design needs: least-privilege RBAC, no privileged container, every flag they set known to the
//! binary, every mount backed by a volume, a plugin configuration the plugin accepts, an admission
//! policy bound to the manifests' own service account (tests/admission_policy.rs evaluates its
//! expressions). The Helm chart's templates cannot be rendered here (no helm binary can be
//! installed from the package registries this project uses); its metadata and values are parsed,
//! and every value a template names must exist.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn installer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("installer")
}

/// Every YAML document of a file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The manifests `kubectl apply -k installer/` applies, keyed by kind.
fn objects() -> Vec<Value> {
    let kustomization = &documents(&installer_dir().join("kustomization.yaml"))[0];
    kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| documents(&installer_dir().join(r.as_str().unwrap())))
        .collect()
}

fn one(objects: &[Value], kind: &str) -> Value {
    let found: Vec<_> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0].clone()
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("{pointer} is missing or not a string in {v}"))
}

#[test]
fn kustomization_lists_exactly_the_manifests_and_each_is_a_known_kind() {
    let kustomization = &documents(&installer_dir().join("kustomization.yaml"))[0];
    assert_eq!(kustomization["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: BTreeSet<String> =
        kustomization["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
    let present: BTreeSet<String> = fs::read_dir(installer_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "every manifest must be in the kustomization, and only those");

    let expected = [
        ("ServiceAccount", "v1", true),
        ("ClusterRole", "rbac.authorization.k8s.io/v1", false),
        ("ClusterRoleBinding", "rbac.authorization.k8s.io/v1", false),
        ("Role", "rbac.authorization.k8s.io/v1", true),
        ("RoleBinding", "rbac.authorization.k8s.io/v1", true),
        ("ConfigMap", "v1", true),
        ("DaemonSet", "apps/v1", true),
        ("ValidatingAdmissionPolicy", "admissionregistration.k8s.io/v1", false),
        ("ValidatingAdmissionPolicyBinding", "admissionregistration.k8s.io/v1", false),
    ];
    let objects = objects();
    assert_eq!(objects.len(), expected.len());
    for (kind, api_version, namespaced) in expected {
        let o = one(&objects, kind);
        assert_eq!(o["apiVersion"], api_version, "{kind}");
        assert_eq!(str_at(&o, "/metadata/name"), "tproxy-cni", "{kind}");
        if namespaced {
            assert_eq!(str_at(&o, "/metadata/namespace"), "kube-system", "{kind}");
        } else {
            assert!(o["metadata"].get("namespace").is_none(), "{kind} is cluster-scoped");
        }
    }
}

#[test]
fn rbac_grants_exactly_the_least_verbs() {
    let objects = objects();
    let role = one(&objects, "ClusterRole");
    let mut grants: Vec<(String, String, String)> = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        let groups = rule["apiGroups"].as_array().unwrap();
        assert_eq!(groups, &[Value::from("")], "core API group only");
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for r in rule["resources"].as_array().unwrap() {
            for v in rule["verbs"].as_array().unwrap() {
                grants.push((String::new(), r.as_str().unwrap().into(), v.as_str().unwrap().into()));
            }
        }
    }
    grants.sort();
    let want = [("", "nodes", "get"), ("", "nodes", "patch"), ("", "pods", "get"), ("", "pods", "patch")];
    let want: Vec<(String, String, String)> =
        want.iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
    assert_eq!(grants, want, "no list/watch, no update, no delete, no wildcard");

    let binding = one(&objects, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"],
        serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tproxy-cni"})
    );
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "tproxy-cni", "namespace": "kube-system"}])
    );

    // The installer reads and watches its own DaemonSet, by name, in its own namespace, and nothing
    // else: a Role, not a ClusterRole (to tell an uninstall from a restart).
    let role = one(&objects, "Role");
    let ds = one(&objects, "DaemonSet");
    assert_eq!(role["metadata"]["namespace"], ds["metadata"]["namespace"]);
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": ["apps"], "resources": ["daemonsets"],
                            "resourceNames": [ds["metadata"]["name"]], "verbs": ["get", "list", "watch"]}]),
        "only its own DaemonSet, read-only"
    );
    let binding = one(&objects, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], role["metadata"]["namespace"]);
    assert_eq!(
        binding["roleRef"],
        serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tproxy-cni"})
    );
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "tproxy-cni", "namespace": "kube-system"}])
    );
    // The chart's Role names the release's DaemonSet the same way.
    let chart = installer_dir().join("helm/tproxy-cni/templates");
    let role = fs::read_to_string(chart.join("role.yaml")).unwrap();
    assert!(role.contains("resourceNames: [{{ .Release.Name | quote }}]"), "{role}");
    assert!(role.contains(r#"verbs: ["get", "list", "watch"]"#) && role.contains(r#"apiGroups: ["apps"]"#));
    let ds = fs::read_to_string(chart.join("daemonset.yaml")).unwrap();
    assert!(ds.contains("kind: DaemonSet\nmetadata:\n  name: {{ .Release.Name }}\n"), "the DaemonSet the Role names");
}

#[test]
fn the_admission_policy_holds_the_manifests_service_account() {
    let objects = objects();
    let sa = one(&objects, "ServiceAccount");
    let user =
        format!("system:serviceaccount:{}:{}", str_at(&sa, "/metadata/namespace"), str_at(&sa, "/metadata/name"));
    let policy = one(&objects, "ValidatingAdmissionPolicy");
    let conditions = policy["spec"]["matchConditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(str_at(&conditions[0], "/expression").trim(), format!("request.userInfo.username == '{user}'"));
    let binding = one(&objects, "ValidatingAdmissionPolicyBinding");
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    // The RBAC grants it polices are the ones the ClusterRole gives that account.
    let rules = &policy["spec"]["matchConstraints"]["resourceRules"][0];
    assert_eq!(rules["resources"], serde_json::json!(["pods", "pods/*", "nodes", "nodes/*"]));
    assert_eq!(rules["operations"], serde_json::json!(["*"]));
}

/// Every key named `privileged` anywhere, and whether any is true.
fn privileged_anywhere(v: &Value) -> bool {
    match v {
        Value::Object(m) => {
            m.iter().any(|(k, v)| (k == "privileged" && v != &Value::Bool(false)) || privileged_anywhere(v))
        }
        Value::Array(a) => a.iter().any(privileged_anywhere),
        _ => false,
    }
}

#[test]
fn the_daemonset_is_unprivileged_node_critical_and_everywhere() {
    let objects = objects();
    let ds = one(&objects, "DaemonSet");
    assert!(!privileged_anywhere(&ds), "no privileged: true anywhere");
    assert_eq!(ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"]);
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["hostNetwork"], true, "the installer must not depend on the CNI chain it manages");
    assert_eq!(spec["serviceAccountName"], one(&objects, "ServiceAccount")["metadata"]["name"]);
    assert!(
        spec["tolerations"].as_array().unwrap().iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint, the start-up taint included"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"], serde_json::json!({"maxSurge": 1, "maxUnavailable": 0}));

    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert!(!str_at(c, "/image").is_empty());
    assert_eq!(c["command"], serde_json::json!(["/tproxy-cni", "install"]));
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"], serde_json::json!({"drop": ["ALL"]}), "no capability added");
    for k in ["requests", "limits"] {
        assert!(c["resources"][k]["memory"].is_string(), "resources.{k}.memory");
    }
    assert!(c["resources"]["requests"]["cpu"].is_string());

    // Every mount is backed by a volume; host paths are mounted where the host has them.
    let volumes = spec["volumes"].as_array().unwrap();
    for m in c["volumeMounts"].as_array().unwrap() {
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap_or_else(|| panic!("no volume for {m}"));
        if let Some(host) = v.pointer("/hostPath/path") {
            assert_eq!(host, &m["mountPath"], "host path {host} mounted elsewhere");
        }
    }

    // The probes hit the address the installer listens on.
    let env = c["env"].as_array().unwrap();
    let env_value =
        |name: &str| env.iter().find(|e| e["name"] == name).and_then(|e| e["value"].as_str()).map(str::to_owned);
    let probe_addr = env_value("TPROXY_CNI_PROBE_ADDR").unwrap();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path);
        assert_eq!(format!("{}:{}", str_at(get, "/host"), get["port"]), probe_addr, "{probe}");
    }
    // The uninstall detector finds its DaemonSet through its own pod (--cleanup-on-exit=auto).
    for (name, field) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
        assert!(env.iter().any(|e| e["name"] == name && e["valueFrom"]["fieldRef"]["fieldPath"] == field), "{name}");
    }
    assert_eq!(env_value("TPROXY_CNI_CLEANUP_ON_EXIT").as_deref(), Some("auto"));
    // The generation marker comes from the DaemonSet's pod-template-generation label.
    assert!(env.iter().any(|e| e["name"] == "POD_TEMPLATE_GENERATION"
        && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['pod-template-generation']"));
}

/// The environment variables the manifests set are flags the binary knows.
#[test]
fn every_environment_variable_the_manifests_set_is_a_flag_of_the_binary() {
    let help = Command::new(env!("CARGO_BIN_EXE_tproxy-cni")).args(["install", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let mut names: Vec<String> = Vec::new();
    let ds = one(&objects(), "DaemonSet");
    for e in ds["spec"]["template"]["spec"]["containers"][0]["env"].as_array().unwrap() {
        names.push(e["name"].as_str().unwrap().to_owned());
    }
    let chart = fs::read_to_string(installer_dir().join("helm/tproxy-cni/templates/daemonset.yaml")).unwrap();
    for line in chart.lines() {
        if let Some(name) =
            line.trim().strip_prefix("- name: ").filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        {
            names.push(name.to_owned());
        }
    }
    assert!(names.len() > 10);
    for name in names {
        assert!(
            help.contains(&format!("[env: {name}=")),
            "{name} is not an environment variable of `tproxy-cni install`"
        );
    }
}

#[test]
fn the_configmap_holds_a_plugin_configuration_the_plugin_accepts() {
    let cm = one(&objects(), "ConfigMap");
    let text = str_at(&cm, "/data/plugin-config.json");
    let settings: serde_json::Map<String, Value> = serde_json::from_str(text).unwrap();
    tproxy_cni::installer::plugin_entry(&settings, Path::new("/etc/cni/net.d/ZZZ-tproxy-cni-kubeconfig")).unwrap();
    // Both state the engine, the default one, so that an operator sees where to choose iptables.
    assert_eq!(settings["backend"], "nftables", "{text}");
    let values = &documents(&installer_dir().join("helm/tproxy-cni/values.yaml"))[0];
    let settings = values["pluginConfig"].as_object().unwrap().clone();
    assert_eq!(settings["backend"], "nftables", "{values}");
    tproxy_cni::installer::plugin_entry(&settings, Path::new("/k")).unwrap();
}

#[test]
fn the_helm_chart_parses_and_its_templates_name_only_existing_values() {
    let chart_dir = installer_dir().join("helm/tproxy-cni");
    let chart = &documents(&chart_dir.join("Chart.yaml"))[0];
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "tproxy-cni");
    assert!(chart["version"].is_string() && chart["appVersion"].is_string());
    let values = &documents(&chart_dir.join("values.yaml"))[0];
    let mut templates = 0;
    for e in fs::read_dir(chart_dir.join("templates")).unwrap() {
        let path = e.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        templates += 1;
        let mut rest = text.as_str();
        while let Some(i) = rest.find(".Values.") {
            rest = &rest[i + ".Values.".len()..];
            let key: String =
                rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_').collect();
            let pointer = format!("/{}", key.trim_end_matches('.').replace('.', "/"));
            assert!(
                values.pointer(&pointer).is_some(),
                "{} uses .Values.{key}, which values.yaml does not define",
                path.display()
            );
        }
        // Templated YAML cannot be parsed before rendering, but the kinds it declares are known.
        let kind = text
            .lines()
            .find_map(|l| l.strip_prefix("kind: "))
            .unwrap_or_else(|| panic!("{} declares no kind", path.display()));
        assert!(
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "ConfigMap",
                "DaemonSet",
                "ValidatingAdmissionPolicy"
            ]
            .contains(&kind),
            "{kind}"
        );
        assert!(!text.contains("privileged: true"));
    }
    assert_eq!(templates, 8);
}
