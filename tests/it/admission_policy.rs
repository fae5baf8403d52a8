//! The installer's ValidatingAdmissionPolicy (`installer/admission-policy.yaml`, and the Helm
//! chart's copy) evaluated for real: its CEL expressions are read from the shipped manifest and run
//! by a CEL interpreter (the `cel` crate, which parses with CEL's own grammar) the way the API
//! server runs a policy — match rules, then `matchConditions`, then `variables`, then every
//! validation, with `failurePolicy: Fail` turning an evaluation error into a denial.
//!
//! The requests are the ones our code sends: the plugin's status-annotation merge patch
//! ([`Client::patch_pod_annotation`]) and the installer's taint-removing JSON patch
//! ([`Client::remove_node_taint`]) go through the real client, over TLS, to the stand-in API server,
//! which shows each patch to the policy as the API server shows an update to admission (stored
//! object as `oldObject`, patched object as `object`, see `admission_view`) and refuses it when the
//! policy denies. The forbidden requests — another node's pod, another annotation, a label, a spec
//! change, another node, another taint, an added taint, a node label — are patches an attacker
//! holding the token could send; each is asserted denied, and by the validation meant to deny it.
//!
//! What differs from the API server: `cel` is not cel-go (no type checker; the expressions keep to
//! the standard macros and operators, whose results both define the same way), and the request
//! object is built here as `CreateAdmissionRequest` builds it (docs/testing.md).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::apiserver::{
    Admission, AdmissionAttributes, ApiServer, Auth, KubeconfigSpec, PodFixture, Refusal, admission_view, apply_patch,
};
use serde_json::{Value, json};
use tproxy_cni::core::mesh::consul::TPROXY_STATUS;
use tproxy_cni::kube::{Client, Patch};

/// The installer's service account, as the API server names its user.
const SA_USER: &str = "system:serviceaccount:kube-system:tproxy-cni";
/// The user extra a pod-bound token's node name arrives in.
const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";

fn installer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("installer")
}

fn documents_of(text: &str, what: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The policy and its binding, as `kubectl apply -k installer/` applies them.
fn kustomize_objects() -> Vec<Value> {
    let path = installer_dir().join("admission-policy.yaml");
    documents_of(&fs::read_to_string(&path).unwrap(), &path.display().to_string())
}

/// The value of an environment variable the kustomize DaemonSet sets.
fn daemonset_env(name: &str) -> String {
    let path = installer_dir().join("daemonset.yaml");
    let ds = &documents_of(&fs::read_to_string(&path).unwrap(), "daemonset.yaml")[0];
    ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("the DaemonSet sets no {name}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// The policy, compiled and evaluated as the API server does.

/// One `matchConstraints.resourceRules` entry.
#[derive(Debug)]
struct Rule {
    api_groups: Vec<String>,
    api_versions: Vec<String>,
    operations: Vec<String>,
    resources: Vec<String>,
}

impl Rule {
    fn matches(&self, group: &str, version: &str, operation: &str, resource: &str, subresource: &str) -> bool {
        let has = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let resource_ok = self.resources.iter().any(|r| {
            let (res, sub) = r.split_once('/').unwrap_or((r, ""));
            (res == "*" || res == resource) && (sub == "*" || sub == subresource)
        });
        has(&self.api_groups, group)
            && has(&self.api_versions, version)
            && has(&self.operations, operation)
            && resource_ok
    }
}

struct Validation {
    program: cel::Program,
    message: String,
    reason: String,
}

/// A compiled ValidatingAdmissionPolicy.
struct Policy {
    env: Arc<cel::Env>,
    rules: Vec<Rule>,
    match_conditions: Vec<(String, cel::Program)>,
    variables: Vec<(String, cel::Program)>,
    validations: Vec<Validation>,
}

/// What the policy decided about one request.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// The request is not for this policy (match rules or a false match condition).
    NotApplicable,
    Admit,
    /// The first validation that failed: its message and reason, and the evaluation error if it
    /// failed by an error (which `failurePolicy: Fail` turns into a denial).
    Deny {
        message: String,
        reason: String,
        error: Option<String>,
    },
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

impl Policy {
    /// Compiles the policy; a parse error is what the API server's validation would refuse it for.
    fn compile(policy: &Value) -> Policy {
        assert_eq!(policy["apiVersion"], "admissionregistration.k8s.io/v1");
        assert_eq!(policy["kind"], "ValidatingAdmissionPolicy");
        let spec = &policy["spec"];
        // What this evaluator implements, and nothing else: it must not meet a field it ignores.
        let known = ["failurePolicy", "matchConstraints", "matchConditions", "variables", "validations"];
        for k in spec.as_object().unwrap().keys() {
            assert!(known.contains(&k.as_str()), "the evaluator does not implement spec.{k}");
        }
        assert_eq!(spec["failurePolicy"], "Fail", "a policy that fails open protects nothing when CEL errs");
        let constraints = spec["matchConstraints"].as_object().unwrap();
        assert_eq!(constraints.keys().collect::<Vec<_>>(), ["resourceRules"], "no selectors, no excludes");
        let rules = constraints["resourceRules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r.get("scope").is_none() && r.get("resourceNames").is_none());
                Rule {
                    api_groups: strings(&r["apiGroups"]),
                    api_versions: strings(&r["apiVersions"]),
                    operations: strings(&r["operations"]),
                    resources: strings(&r["resources"]),
                }
            })
            .collect();
        let env = Arc::new(cel::Env::stdlib());
        let compile = |what: &str, expression: &Value| -> cel::Program {
            let source = expression.as_str().unwrap_or_else(|| panic!("{what} has no expression"));
            env.compile(source).unwrap_or_else(|e| panic!("{what} does not compile: {e}\n{source}"))
        };
        let named = |list: &Value, what: &str| -> Vec<(String, cel::Program)> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let name = c["name"].as_str().unwrap().to_owned();
                    let program = compile(&format!("{what} {name}"), &c["expression"]);
                    (name, program)
                })
                .collect()
        };
        let match_conditions = named(&spec["matchConditions"], "matchCondition");
        let variables = named(&spec["variables"], "variable");
        let validations = spec["validations"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, v)| {
                for k in v.as_object().unwrap().keys() {
                    assert!(["expression", "message", "reason"].contains(&k.as_str()), "validation {i}: {k}");
                }
                Validation {
                    program: compile(&format!("validation {i}"), &v["expression"]),
                    message: v["message"].as_str().unwrap().to_owned(),
                    reason: v["reason"].as_str().unwrap_or("Invalid").to_owned(),
                }
            })
            .collect();
        Policy { env, rules, match_conditions, variables, validations }
    }

    /// Decides on one request: `request` as `CreateAdmissionRequest` builds it, `object` and
    /// `old_object` as the API server converts them (null for a create's old object, a delete's
    /// new one).
    fn decide(&self, request: &Value, object: &Value, old_object: &Value) -> Outcome {
        let (group, version) = (str_of(request, "/resource/group"), str_of(request, "/resource/version"));
        let resource = str_of(request, "/resource/resource");
        let subresource = request.get("subResource").and_then(Value::as_str).unwrap_or("");
        let operation = str_of(request, "/operation");
        if !self.rules.iter().any(|r| r.matches(group, version, operation, resource, subresource)) {
            return Outcome::NotApplicable;
        }

        let mut ctx = cel::Context::with_env(self.env.clone());
        for (name, value) in [
            ("request", request),
            ("object", object),
            ("oldObject", old_object),
            ("params", &Value::Null),
            ("namespaceObject", &Value::Null),
        ] {
            ctx.add_variable_from_value(name, to_cel(value));
        }

        // Every match condition must be true; a false one wins over an error; an error alone
        // follows the failure policy (Fail: deny).
        let mut condition_error = None;
        for (name, program) in &self.match_conditions {
            match program.execute(&ctx) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => return Outcome::NotApplicable,
                other => condition_error = Some(format!("matchCondition {name}: {other:?}")),
            }
        }
        if let Some(error) = condition_error {
            return Outcome::Deny { message: error.clone(), reason: "Invalid".into(), error: Some(error) };
        }

        // Variables see the ones before them. The API server evaluates one when an expression first
        // uses it; one whose evaluation fails is left out here, so that using it fails the same way.
        let mut variables: HashMap<String, cel::Value> = HashMap::new();
        for (name, program) in &self.variables {
            ctx.add_variable_from_value("variables", cel::Value::from(variables.clone()));
            if let Ok(v) = program.execute(&ctx) {
                variables.insert(name.clone(), v);
            }
        }
        ctx.add_variable_from_value("variables", cel::Value::from(variables));

        let mut first_failure = None;
        for v in &self.validations {
            let result = v.program.execute(&ctx);
            let failure = match result {
                Ok(cel::Value::Bool(true)) => continue,
                Ok(cel::Value::Bool(false)) => None,
                Ok(other) => Some(format!("not a bool: {other:?}")),
                Err(e) => Some(e.to_string()),
            };
            first_failure.get_or_insert(Outcome::Deny {
                message: v.message.clone(),
                reason: v.reason.clone(),
                error: failure,
            });
        }
        first_failure.unwrap_or(Outcome::Admit)
    }
}

fn str_of<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("{pointer} missing in {v}"))
}

/// JSON as the API server hands unstructured objects to CEL: integers are int64.
fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().expect("a JSON number")),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(to_cel).collect())),
        Value::Object(m) => {
            let map: HashMap<String, cel::Value> = m.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// The policy and binding of the kustomize manifest, checked against each other.
fn shipped_policy() -> Policy {
    let objects = kustomize_objects();
    assert_eq!(objects.len(), 2, "a policy and its binding");
    let (policy, binding) = (&objects[0], &objects[1]);
    assert_eq!(binding["apiVersion"], "admissionregistration.k8s.io/v1");
    assert_eq!(binding["kind"], "ValidatingAdmissionPolicyBinding");
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]), "enforced, not only audited");
    let keys: Vec<&String> = binding["spec"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["policyName", "validationActions"], "no paramRef, no matchResources: every match of the policy");
    Policy::compile(policy)
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// Who sends a request.
#[derive(Debug, Clone)]
struct User {
    name: String,
    /// The node a pod-bound token names, if the cluster puts it there.
    node: Option<String>,
}

impl User {
    fn installer_on(node: &str) -> User {
        User { name: SA_USER.into(), node: Some(node.into()) }
    }
    /// The installer's account, with a token that names no node (node info switched off).
    fn installer_without_node_info() -> User {
        User { name: SA_USER.into(), node: None }
    }

    /// `userInfo` as a pod-bound service-account token yields it, converted as the API server
    /// converts the request (empty fields left out).
    fn user_info(&self) -> Value {
        let mut extra = json!({
            "authentication.kubernetes.io/pod-name": ["tproxy-cni-x7k2p"],
            "authentication.kubernetes.io/pod-uid": ["0b7a3c2e-1d4f-4e5a-9b8c-7d6e5f4a3b2c"],
            "authentication.kubernetes.io/credential-id": ["JTI=5f1c2b3a-0000-4000-8000-000000000001"],
        });
        if let Some(node) = &self.node {
            extra[NODE_NAME_KEY] = json!([node]);
            extra["authentication.kubernetes.io/node-uid"] = json!(["4d6e8f00-0000-4000-8000-0000000000aa"]);
        }
        let namespace = self.name.split(':').nth(2).unwrap_or("default");
        json!({
            "username": self.name,
            "uid": "9e8d7c6b-0000-4000-8000-000000000002",
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
            "extra": extra,
        })
    }
}

/// The `request` variable for a request on `resource` (`pods`, `nodes`), as
/// `CreateAdmissionRequest` builds it and the unstructured converter leaves it: a PATCH is an
/// `UPDATE`; `subResource`, `name`, `namespace` are absent when empty (`omitempty`).
fn admission_request(
    resource: &str,
    subresource: &str,
    namespace: Option<&str>,
    name: &str,
    operation: &str,
    user: &User,
) -> Value {
    let kind = match resource {
        "pods" => "Pod",
        "nodes" => "Node",
        other => panic!("no kind for {other}"),
    };
    let mut r = json!({
        "uid": "",
        "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": resource},
        "requestKind": {"group": "", "version": "v1", "kind": kind},
        "requestResource": {"group": "", "version": "v1", "resource": resource},
        "name": name,
        "operation": operation,
        "userInfo": user.user_info(),
        "dryRun": false,
        "options": {"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "tproxy-cni"},
    });
    if !subresource.is_empty() {
        r["subResource"] = json!(subresource);
        r["requestSubResource"] = json!(subresource);
    }
    if let Some(ns) = namespace {
        r["namespace"] = json!(ns);
    }
    r
}

/// The policy's decision on an update from `old` to `new` (stored JSON, shown to admission as the
/// API server shows it).
fn decide_update(policy: &Policy, user: &User, old: &Value, new: &Value) -> Outcome {
    let resource = if old["kind"] == "Pod" { "pods" } else { "nodes" };
    let namespace = old["metadata"]["namespace"].as_str();
    let request = admission_request(resource, "", namespace, str_of(old, "/metadata/name"), "UPDATE", user);
    policy.decide(&request, &admission_view(new, Some(old)), &admission_view(old, None))
}

// ---------------------------------------------------------------------------------------------
// The stand-in API server with the policy in its write path.

const TOKEN_NODE1: &str = "pod-bound-token-of-the-installer-on-node-1";
const TOKEN_NO_NODE_INFO: &str = "pod-bound-token-without-node-info";
const TOKEN_OTHER_ACCOUNT: &str = "token-of-another-service-account-on-node-1";

struct Cluster {
    api: ApiServer,
    /// Every decision the policy made, in order.
    decisions: Arc<Mutex<Vec<Outcome>>>,
}

impl Cluster {
    fn start() -> Cluster {
        let api = ApiServer::start();
        for t in [TOKEN_NODE1, TOKEN_NO_NODE_INFO, TOKEN_OTHER_ACCOUNT] {
            api.add_token(t);
        }
        let policy = shipped_policy();
        let decisions = Arc::new(Mutex::new(Vec::new()));
        let log = decisions.clone();
        let admission: Admission = Arc::new(move |a: &AdmissionAttributes| {
            let user = match a.bearer.as_deref() {
                Some(TOKEN_NODE1) => User::installer_on("node-1"),
                Some(TOKEN_NO_NODE_INFO) => User::installer_without_node_info(),
                Some(TOKEN_OTHER_ACCOUNT) => {
                    User { name: "system:serviceaccount:kube-system:other".into(), node: Some("node-1".into()) }
                }
                other => panic!("a request with an unexpected token {other:?}"),
            };
            let request = admission_request(a.resource, "", a.namespace.as_deref(), &a.name, "UPDATE", &user);
            let outcome = policy.decide(&request, &a.object, &a.old_object);
            log.lock().unwrap().push(outcome.clone());
            match outcome {
                Outcome::NotApplicable | Outcome::Admit => Ok(()),
                Outcome::Deny { message, reason, .. } => Err(Refusal {
                    status: match reason.as_str() {
                        "Forbidden" => 403,
                        "Unauthorized" => 401,
                        "RequestEntityTooLarge" => 413,
                        _ => 422,
                    },
                    message: format!(
                        "ValidatingAdmissionPolicy 'tproxy-cni' with binding 'tproxy-cni' denied request: {message}"
                    ),
                    reason,
                }),
            }
        });
        api.set_admission(Some(admission));
        Cluster { api, decisions }
    }

    fn client(&self, token: &str) -> Client {
        let spec = KubeconfigSpec { auth: Auth::Token(token.into()), ..Default::default() };
        let kubeconfig = self.api.kubeconfig(&format!("kubeconfig-{token}"), &spec);
        Client::from_kubeconfig(&kubeconfig, Duration::from_secs(5)).unwrap()
    }

    fn last_decision(&self) -> Outcome {
        self.decisions.lock().unwrap().last().cloned().expect("the policy saw no request")
    }
}

fn taint(key: &str, effect: &str) -> Value {
    json!({"key": key, "effect": effect, "timeAdded": "2026-11-21T09:59:00Z"})
}

/// Asserts a denial by the validation whose message contains `rule`, by a false result (not an
/// evaluation error, which would deny for the wrong reason).
fn assert_denied(outcome: &Outcome, rule: &str, case: &str) {
    match outcome {
        Outcome::Deny { message, reason, error } => {
            assert!(message.contains(rule), "{case}: denied by {message:?}, expected the rule {rule:?}");
            assert_eq!(reason, "Forbidden", "{case}");
            assert!(error.is_none(), "{case}: denied by an evaluation error: {error:?}");
        }
        other => panic!("{case}: expected a denial by {rule:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn every_expression_compiles_and_every_validation_answers_403() {
    let objects = kustomize_objects();
    let policy = Policy::compile(&objects[0]);
    assert!(!policy.validations.is_empty() && !policy.variables.is_empty());
    for v in &policy.validations {
        // Our client reads 422 as a concurrent change and retries at once; a refusal must be 403.
        assert_eq!(v.reason, "Forbidden", "{}", v.message);
    }
    // The policy only looks at this account's requests.
    assert_eq!(policy.match_conditions.len(), 1);
    let pod = json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p", "namespace": "n"}, "spec": {"nodeName": "node-1"}});
    let mut other = User::installer_on("node-1");
    other.name = "system:serviceaccount:kube-system:other".into();
    let mut changed = pod.clone();
    changed["spec"]["nodeName"] = json!("node-2");
    assert_eq!(decide_update(&policy, &other, &pod, &changed), Outcome::NotApplicable);
    assert_denied(&decide_update(&policy, &User::installer_on("node-1"), &pod, &changed), "pod's spec", "spec change");
}

#[test]
fn the_plugins_status_annotation_patch_is_allowed_on_its_own_nodes_pods() {
    let c = Cluster::start();
    c.api.add_pod(PodFixture::consul("shop", "web-1"));
    c.api.add_pod(PodFixture::new("shop", "bare").on_node("node-1"));
    let client = c.client(TOKEN_NODE1);
    // Changed, as the plugin does it around ADD: "enabled" (the webhook's) → waiting → complete.
    for value in ["waiting", "complete"] {
        client.patch_pod_annotation("shop", "web-1", TPROXY_STATUS, value).unwrap();
        assert_eq!(c.last_decision(), Outcome::Admit);
        assert_eq!(c.api.pod_annotation("shop", "web-1", TPROXY_STATUS).as_deref(), Some(value));
    }
    // Added, on a pod that had no annotation at all.
    client.patch_pod_annotation("shop", "bare", TPROXY_STATUS, "waiting").unwrap();
    assert_eq!(c.last_decision(), Outcome::Admit);

    // Removed (our code never does, but the key is ours): a merge patch with null.
    let policy = shipped_policy();
    let old = c.api.pod("shop", "web-1").unwrap();
    let new =
        apply_patch(&old, "application/merge-patch+json", &json!({"metadata": {"annotations": {TPROXY_STATUS: null}}}))
            .unwrap();
    assert!(new["metadata"]["annotations"].get(TPROXY_STATUS).is_none());
    assert_eq!(decide_update(&policy, &User::installer_on("node-1"), &old, &new), Outcome::Admit);
    // Removing the last annotation leaves no annotations map at all: still allowed.
    let old = c.api.pod("shop", "bare").unwrap();
    let new =
        apply_patch(&old, "application/merge-patch+json", &json!({"metadata": {"annotations": {TPROXY_STATUS: null}}}))
            .unwrap();
    assert_eq!(decide_update(&policy, &User::installer_on("node-1"), &old, &new), Outcome::Admit);
}

#[test]
fn the_installers_taint_removal_is_allowed_on_its_own_node() {
    let key = daemonset_env("TPROXY_CNI_STARTUP_TAINT");
    let c = Cluster::start();
    let other = taint("example.com/gpu", "NoSchedule");
    c.api.add_node("node-1", vec![other.clone(), taint(&key, "NoSchedule"), taint(&key, "NoExecute")]);
    let client = c.client(TOKEN_NODE1);
    assert!(client.remove_node_taint("node-1", &key).unwrap());
    assert_eq!(c.last_decision(), Outcome::Admit);
    assert_eq!(c.api.node("node-1").unwrap()["spec"]["taints"], json!([other]), "ours gone, the other kept");

    // A node whose only taint is ours: the list ends empty, and admission sees no taints at all.
    c.api.add_node("node-1", vec![taint(&key, "NoSchedule")]);
    assert!(client.remove_node_taint("node-1", &key).unwrap());
    assert_eq!(c.last_decision(), Outcome::Admit);
    assert_eq!(c.api.node("node-1").unwrap()["spec"]["taints"], json!([]));
    // Nothing left to remove: no patch at all.
    assert!(!client.remove_node_taint("node-1", &key).unwrap());
}

#[test]
fn another_nodes_pods_and_node_are_refused() {
    let key = daemonset_env("TPROXY_CNI_STARTUP_TAINT");
    let c = Cluster::start();
    c.api.add_pod(PodFixture::consul("shop", "elsewhere").on_node("node-2"));
    c.api.add_node("node-2", vec![taint(&key, "NoSchedule")]);
    let client = c.client(TOKEN_NODE1);

    let e = client.patch_pod_annotation("shop", "elsewhere", TPROXY_STATUS, "complete").unwrap_err();
    assert!(e.to_string().contains("403 Forbidden") && e.to_string().contains("its own node"), "{e}");
    assert_denied(&c.last_decision(), "its own node", "status annotation on another node's pod");
    assert_eq!(c.api.pod_annotation("shop", "elsewhere", TPROXY_STATUS).as_deref(), Some("enabled"), "unchanged");

    let e = client.remove_node_taint("node-2", &key).unwrap_err();
    assert!(e.to_string().contains("403 Forbidden"), "{e}");
    assert_denied(&c.last_decision(), "its own node", "start-up taint of another node");
    assert_eq!(c.api.node("node-2").unwrap()["spec"]["taints"], json!([taint(&key, "NoSchedule")]), "still there");
    assert_eq!(c.api.patches().len(), 2, "a refusal is not retried as if it were a conflict");
}

#[test]
fn anything_but_the_status_annotation_on_a_pod_is_refused() {
    let c = Cluster::start();
    c.api.add_pod(PodFixture::consul("shop", "web-1"));
    let client = c.client(TOKEN_NODE1);
    // Another annotation, through the very call the plugin uses.
    let e =
        client.patch_pod_annotation("shop", "web-1", "consul.hashicorp.com/connect-inject-status", "no").unwrap_err();
    assert!(e.to_string().contains("403 Forbidden"), "{e}");
    assert_denied(&c.last_decision(), "no annotation but", "another annotation");
    assert_eq!(
        c.api.pod_annotation("shop", "web-1", "consul.hashicorp.com/connect-inject-status").as_deref(),
        Some("injected")
    );

    // What else a token holder could send about a pod on its own node.
    let policy = shipped_policy();
    let me = User::installer_on("node-1");
    let old = c.api.pod("shop", "web-1").unwrap();
    let merge = |patch: Value| apply_patch(&old, "application/merge-patch+json", &patch).unwrap();
    let cases = [
        ("a label added", merge(json!({"metadata": {"labels": {"app": "payments"}}})), "labels"),
        (
            "a label removed",
            merge(json!({"metadata": {"labels": {"consul.hashicorp.com/connect-inject-status": null}}})),
            "labels",
        ),
        ("a finalizer", merge(json!({"metadata": {"finalizers": ["example.com/hold"]}})), "labels, finalizers"),
        (
            "an owner",
            merge(
                json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": "u"}]}}),
            ),
            "owners",
        ),
        (
            "the container image",
            apply_patch(
                &old,
                "application/json-patch+json",
                &json!([{"op": "replace", "path": "/spec/containers/0/image", "value": "evil.example/app:1"}]),
            )
            .unwrap(),
            "pod's spec",
        ),
        ("a toleration", merge(json!({"spec": {"tolerations": [{"operator": "Exists"}]}})), "pod's spec"),
        (
            "another annotation removed",
            merge(json!({"metadata": {"annotations": {"consul.hashicorp.com/redirect-traffic-config": null}}})),
            "no annotation but",
        ),
        (
            "the status annotation and another",
            merge(json!({"metadata": {"annotations": {TPROXY_STATUS: "complete", "example.com/x": "y"}}})),
            "no annotation but",
        ),
    ];
    for (case, new, rule) in cases {
        assert_ne!(new, old, "{case}: the patch changes something");
        assert_denied(&decide_update(&policy, &me, &old, &new), rule, case);
    }

    // A status patch is refused too (no subresource; the API server would reset status anyway).
    let request = admission_request("pods", "status", Some("shop"), "web-1", "UPDATE", &me);
    let view = admission_view(&old, None);
    assert_denied(&policy.decide(&request, &view, &view), "themselves", "pods/status");
    // So are a delete and an eviction, which RBAC does not grant either.
    let delete = admission_request("pods", "", Some("shop"), "web-1", "DELETE", &me);
    assert_denied(&policy.decide(&delete, &Value::Null, &view), "themselves", "delete");
    let evict = admission_request("pods", "eviction", Some("shop"), "web-1", "CREATE", &me);
    let eviction =
        json!({"kind": "Eviction", "apiVersion": "policy/v1", "metadata": {"name": "web-1", "namespace": "shop"}});
    assert_denied(&policy.decide(&evict, &eviction, &Value::Null), "themselves", "eviction");
}

#[test]
fn anything_but_removing_the_start_up_taint_from_a_node_is_refused() {
    let key = daemonset_env("TPROXY_CNI_STARTUP_TAINT");
    let c = Cluster::start();
    let gpu = taint("example.com/gpu", "NoSchedule");
    c.api.add_node("node-1", vec![gpu.clone(), taint(&key, "NoSchedule")]);
    let client = c.client(TOKEN_NODE1);

    // A node label, through the client's node patch.
    let e = client
        .patch_node(
            "node-1",
            Patch::Merge(json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}})),
        )
        .unwrap_err();
    assert!(e.to_string().contains("403 Forbidden"), "{e}");
    assert_denied(&c.last_decision(), "labels", "a node label");

    let policy = shipped_policy();
    let me = User::installer_on("node-1");
    let old = c.api.node("node-1").unwrap();
    let json_patch = |ops: Value| apply_patch(&old, "application/json-patch+json", &ops).unwrap();
    let merge = |patch: Value| apply_patch(&old, "application/merge-patch+json", &patch).unwrap();
    let cases = [
        ("another taint removed", json_patch(json!([{"op": "remove", "path": "/spec/taints/0"}])), "start-up taint"),
        (
            "every taint removed",
            json_patch(json!([{"op": "remove", "path": "/spec/taints/1"}, {"op": "remove", "path": "/spec/taints/0"}])),
            "start-up taint",
        ),
        (
            "a taint added",
            json_patch(
                json!([{"op": "add", "path": "/spec/taints/-", "value": taint("example.com/evict", "NoExecute")}]),
            ),
            "start-up taint",
        ),
        (
            "ours removed, another added",
            json_patch(
                json!([{"op": "replace", "path": "/spec/taints/1", "value": taint("example.com/evict", "NoExecute")}]),
            ),
            "start-up taint",
        ),
        (
            "our taint's effect changed",
            json_patch(json!([{"op": "replace", "path": "/spec/taints/1/effect", "value": "NoExecute"}])),
            "start-up taint",
        ),
        ("cordoned", merge(json!({"spec": {"unschedulable": true}})), "nothing in a node's spec"),
        ("the pod CIDR changed", merge(json!({"spec": {"podCIDR": "10.9.0.0/24"}})), "nothing in a node's spec"),
        ("a provider id", merge(json!({"spec": {"providerID": "aws:///x"}})), "nothing in a node's spec"),
        ("an annotation", merge(json!({"metadata": {"annotations": {"example.com/x": "y"}}})), "no annotation but"),
        (
            "the Consul annotation on a node",
            merge(json!({"metadata": {"annotations": {TPROXY_STATUS: "complete"}}})),
            "no annotation but",
        ),
        ("a label removed", merge(json!({"metadata": {"labels": null}})), "labels"),
    ];
    for (case, new, rule) in cases {
        assert_ne!(new, old, "{case}: the patch changes something");
        assert_denied(&decide_update(&policy, &me, &old, &new), rule, case);
    }
    // A status write (nodes/status, which RBAC does not grant) is refused as well.
    let request = admission_request("nodes", "status", None, "node-1", "UPDATE", &me);
    let view = admission_view(&old, None);
    assert_denied(&policy.decide(&request, &view, &view), "themselves", "nodes/status");
}

#[test]
fn a_token_without_node_info_is_still_held_to_the_annotation_and_the_taint() {
    let key = daemonset_env("TPROXY_CNI_STARTUP_TAINT");
    let c = Cluster::start();
    c.api.add_pod(PodFixture::consul("shop", "elsewhere").on_node("node-2"));
    c.api.add_node("node-2", vec![taint("example.com/gpu", "NoSchedule"), taint(&key, "NoSchedule")]);
    let client = c.client(TOKEN_NO_NODE_INFO);
    // Without the node name the own-node check cannot be made: any node's pod and Node...
    client.patch_pod_annotation("shop", "elsewhere", TPROXY_STATUS, "complete").unwrap();
    assert_eq!(c.last_decision(), Outcome::Admit);
    assert!(client.remove_node_taint("node-2", &key).unwrap());
    assert_eq!(c.last_decision(), Outcome::Admit);
    // ...but still only the one annotation and the one taint.
    let e = client.patch_pod_annotation("shop", "elsewhere", "example.com/x", "y").unwrap_err();
    assert!(e.to_string().contains("403 Forbidden"), "{e}");
    assert_denied(&c.last_decision(), "no annotation but", "another annotation, no node info");
    let policy = shipped_policy();
    let old = c.api.node("node-2").unwrap();
    let new =
        apply_patch(&old, "application/json-patch+json", &json!([{"op": "remove", "path": "/spec/taints/0"}])).unwrap();
    assert_denied(
        &decide_update(&policy, &User::installer_without_node_info(), &old, &new),
        "start-up taint",
        "another taint",
    );
}

#[test]
fn other_accounts_are_not_this_policys_business() {
    let c = Cluster::start();
    c.api.add_pod(PodFixture::consul("shop", "elsewhere").on_node("node-2"));
    let client = c.client(TOKEN_OTHER_ACCOUNT);
    client.patch_pod_annotation("shop", "elsewhere", "example.com/x", "y").unwrap();
    assert_eq!(c.last_decision(), Outcome::NotApplicable);
}

/// The chart's template, rendered with the chart's default values for the few template actions it
/// uses (no helm binary here), yields the kustomize objects plus Helm's instance label: the CEL the
/// tests above evaluate is the CEL both ship.
#[test]
fn the_helm_chart_ships_the_same_policy_unless_turned_off() {
    let chart = installer_dir().join("helm/tproxy-cni");
    let values = &documents_of(&fs::read_to_string(chart.join("values.yaml")).unwrap(), "values.yaml")[0];
    assert_eq!(values["admissionPolicy"], true, "on by default");
    let template = fs::read_to_string(chart.join("templates/admission-policy.yaml")).unwrap();
    let render = |enabled: bool| -> String {
        let mut out = String::new();
        let mut depth_off = false;
        for line in template.lines() {
            match line.trim() {
                "{{- if .Values.admissionPolicy }}" => depth_off = !enabled,
                "{{- end }}" => depth_off = false,
                _ if depth_off => {}
                _ => {
                    let line = line
                        .replace("{{ .Release.Name }}", "tproxy-cni")
                        .replace("{{ .Release.Namespace }}", "kube-system")
                        .replace("{{ .Values.startupTaint }}", values["startupTaint"].as_str().unwrap());
                    assert!(!line.contains("{{"), "a template action this rendering does not know: {line}");
                    out.push_str(&line);
                    out.push('\n');
                }
            }
        }
        out
    };
    let mut rendered = documents_of(&render(true), "the rendered chart");
    for o in &mut rendered {
        let labels = o["metadata"]["labels"].as_object_mut().unwrap();
        assert_eq!(labels.remove("app.kubernetes.io/instance"), Some(json!("tproxy-cni")));
    }
    assert_eq!(rendered, kustomize_objects(), "the chart's policy differs from installer/admission-policy.yaml");
    assert!(documents_of(&render(false), "the chart without the policy").is_empty(), "admissionPolicy: false");
}
