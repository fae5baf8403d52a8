#!/usr/bin/env python3
"""Writes the hand-made seeds of each fuzz target into fuzz/corpus/TARGET (run from fuzz/).

The seeds are the golden cases (tests/golden) turned into each target's input format, plus a few
inputs per target that reach its refusals. hack/fuzz.sh --merge later minimises each corpus
together with what fuzzing found; re-run this only to add seeds.
"""
import glob, hashlib, json, os

def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)

def records(pairs):
    return b"\0".join(f"{k}={v}".encode() for k, v in pairs)

golden = {}
for path in sorted(glob.glob("../tests/golden/*/*.json")):
    golden[path] = json.load(open(path))

for path, case in golden.items():
    a = case["annotations"]
    mesh = path.split("/")[-2]
    put("consul_annotations" if mesh == "consul" else "kuma_annotations", records(sorted(a.items())))
    if "consul.hashicorp.com/redirect-traffic-config" in a:
        flags = (1 if case.get("pod_ipv6") else 0) | (2 if a.get("consul.hashicorp.com/dual-stack") == "true" else 0)
        put("consul_json", bytes([flags]) + a["consul.hashicorp.com/redirect-traffic-config"].encode())
    if "traffic.kuma.io/transparent-proxy-config" in a:
        put("kuma_yaml", a["traffic.kuma.io/transparent-proxy-config"])
    if "traffic.kuma.io/exclude-outbound-ports-for-uids" in a:
        for entry in a["traffic.kuma.io/exclude-outbound-ports-for-uids"].split(";"):
            put("value_parsers", bytes([7]) + entry.encode())
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}] + ([{"address": "fd00::5/64"}] if case.get("pod_ipv6") else [])}
    conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tproxy-cni", "prevResult": prev,
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": a}}
    env = [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc123"), ("CNI_IFNAME", "eth0"),
           ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")]
    put("cni_invocation", records(env) + b"\0\0" + json.dumps(conf).encode())

base = {"cniVersion": "1.0.0", "name": "n", "type": "tproxy-cni"}
for command, conf in [
    ("VERSION", {"cniVersion": "0.4.0"}),
    ("DEL", base),
    ("CHECK", dict(base, prevResult={"cniVersion": "1.0.0", "ips": []})),
    ("GC", dict(base, cniVersion="1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]})),
    ("STATUS", dict(base, cniVersion="1.1.0")),
    ("ADD", dict(base, cniVersion="0.3.1", prevResult={"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.0.0.2/24"}]})),
    ("ADD", dict(base, exclude_namespaces=["kube-system"], installer_pods={"namespace": "x", "name_prefix": "tproxy-"}, api_timeout="1m30s", default_namespace="podman")),
]:
    env = [("CNI_COMMAND", command), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0"), ("CNI_ARGS", "K8S_POD_NAME=x;CONSUL_IPTABLES_CONFIG={\"ProxyUserID\":\"5995\",\"ProxyInboundPort\":20000}")]
    put("cni_invocation", records(env) + b"\0\0" + json.dumps(conf).encode())

for args in ["IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=2f1c",
             "K8S_POD_NAME=a;K8S_POD_NAME=b", "FOO=bar", "IgnoreUnknown=true;FOO=bar;IP=10.0.0.1;MAC=x",
             'CONSUL_IPTABLES_CONFIG={"a":"b=c"}', "K8S_POD_NAME"]:
    put("cni_args", args)

for which, texts in [
    (0, ["8080", "0", "65536", "080", "+1"]),
    (1, ["8000:9000", "8000-9000", "9000:8000", "1:65535"]),
    (2, ["5995", "4294967294", "4294967295", "-1"]),
    (3, ["1000-2000", "2-1", "0-0"]),
    (4, ["127.0.0.1", "::1", "fe80::1%eth0", "::ffff:1.2.3.4"]),
    (5, ["10.0.0.0/8", "192.0.2.130/25", "2001:db8::/32", "198.51.100.7", "::/0", "10.0.0.0/33"]),
    (6, [" 80, 443,,", "a,b\n,c"]),
    (7, ["tcp:22:1000", "udp:53,60-70:42", "*:*:7", "::5", "tcp:80:1,2", "TCP,udp:22,8000-8010:1000-1999"]),
    (8, ["1m30s", "500ms", "1.5s", "2h", "1..5s"]),
]:
    for t in texts:
        put("value_parsers", bytes([which]) + t.encode())

for y in ["{}", "cniMode: true\nredirect:\n  dns: {enabled: true, port: 0}\n", "a: &a [*a, *a]\n",
          "kumaDPUser: 5678\nredirect:\n  outbound:\n    excludePortsForUIDs: ['tcp:22:1000']\n    excludePorts: '80, 443'\n"]:
    put("kuma_yaml", y)

kubeconfig = """apiVersion: v1
kind: Config
current-context: node
clusters:
- name: local
  cluster:
    server: https://10.96.0.1:443
    insecure-skip-tls-verify: true
contexts:
- name: node
  context: {cluster: local, user: plugin}
users:
- name: plugin
  user:
    token: c2VjcmV0LXRva2VuLXZhbHVlLTEyMzQ1
"""
put("kubeconfig", kubeconfig)
put("kubeconfig", kubeconfig.replace("    insecure-skip-tls-verify: true\n", "    certificate-authority: ca.crt\n"))
put("kubeconfig", kubeconfig.replace("token: c2VjcmV0LXRva2VuLXZhbHVlLTEyMzQ1", "tokenFile: /var/run/secrets/token"))
put("kubeconfig", json.dumps({"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k"}}],
                              "clusters": [{"name": "k", "cluster": {"server": "https://[fd00::1]:6443/prefix/"}}]}))
put("kubeconfig", kubeconfig.replace("    token:", "    exec: {command: x}\n    token:"))

# The installer's conflist merger: every example configuration (shape from the file name), and a
# few that exercise older entries of ours, a rival mesh CNI and an unsupported version.
for path in sorted(glob.glob("../cni-conf/**/*", recursive=True)):
    if os.path.isfile(path) and path.endswith((".conflist", ".conf", ".json")):
        put("conflist_merge", bytes([0 if path.endswith(".conflist") else 1]) + open(path, "rb").read())
for conf in [
    b'\x00{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"tproxy-cni","old":true},{"type":"portmap"},{"type":"tproxy-cni"}]}',
    b'\x01{"cniVersion":"0.3.1","name":"flannel","type":"flannel","delegate":{"isDefaultGateway":true},"z":[1,2]}',
    b'\x00{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"bridge"}]}',
    b'\x00{"name":"x","plugins":[{"type":"consul-cni"},{"type":"tproxy-cni","name":"tproxy-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}],"cniVersion":"1.1.0"}',
]:
    put("conflist_merge", conf)
