#!/usr/bin/env python3
"""Writes fuzz/dicts/TARGET.dict (run from fuzz/): the keys and words each target's parser knows,
read from the dialects' sources where they are constants, so mutations find them at once."""
import re

def escape(w):
    out = ""
    for b in w.encode():
        c = chr(b)
        if c in '"\\':
            out += "\\" + c
        elif 0x20 <= b < 0x7f:
            out += c
        else:
            out += "\\x%02X" % b
    return out

def write(name, words):
    seen = []
    for w in words:
        if w not in seen:
            seen.append(w)
    with open(f"dicts/{name}.dict", "w") as f:
        f.write(f"# libFuzzer dictionary of the {name} target (written by seeds/make_dicts.py).\n")
        for w in seen:
            f.write('"' + escape(w) + '"\n')

consul_keys = re.findall(r'pub const [A-Z_]+: &str = "([^"]+)"', open("../src/mesh/consul.rs").read())
kuma_keys = re.findall(r'pub const [A-Z_]+: &str = "([^"]+)"', open("../src/mesh/kuma.rs").read())
json_keys = ["ConsulDNSIP", "ConsulDNSPort", "ProxyUserID", "ProxyInboundPort", "ProxyOutboundPort",
             "ExcludeInboundPorts", "ExcludeOutboundPorts", "ExcludeOutboundCIDRs", "ExcludeUIDs", "NetNS",
             "IptablesProvider"]
values = ["true", "false", "TRUE", "enabled", "disabled", "injected", "null", "127.0.0.1", "::1", "0.0.0.0/0",
          "::/0", "10.0.0.0/8", "fd00::/8", "65535", "65536", "4294967294", "4294967295", "-1", "0", " -j ACCEPT",
          "\n-A OUTPUT", "\\n", "\u2028", "\r"]
write("consul_json", [f'"{k}":' for k in json_keys] + values + ["[", "]", "{", "}", ",", '""'])
write("consul_annotations", [k + "=" for k in consul_keys] + values + [",", "\0"])
yaml_keys = ["kumaDPUser", "ipFamilyMode", "redirect", "inbound", "outbound", "dns", "vnet", "networks", "enabled",
             "port", "excludePorts", "includePorts", "excludePortsForIPs", "excludePortsForUIDs",
             "insertRedirectInsteadOfAppend", "captureAll", "skipConntrackZoneSplit", "resolvConfigPath",
             "dropInvalidPackets", "log", "level", "cniMode", "ebpf", "retry", "wait"]
write("kuma_yaml", [k + ":" for k in yaml_keys] + ["dualstack", "ipv4", "tcp:", "udp:", "*:", "- ", "{", "}", "[",
                                                   "]", "&a", "*a", "!!str", "'", "---", "\n  "] + values)
write("kuma_annotations", [k + "=" for k in kuma_keys] + ["dualstack", "ipv4", "tcp:", "udp:", "*:", ";", ",", "\0"]
      + values + [k + "=" for k in consul_keys[:3]])
write("cni_args", ["K8S_POD_NAME=", "K8S_POD_NAMESPACE=", "K8S_POD_UID=", "K8S_POD_INFRA_CONTAINER_ID=",
                   "CONSUL_IPTABLES_CONFIG=", "IgnoreUnknown=1", "IgnoreUnknown=true", "IP=", "MAC=",
                   "K8S_POD_NETWORK=", ";", "="])
write("value_parsers", [chr(i) for i in range(9)] + [":", "-", ",", "*", "tcp", "udp", "/", "::", "ms", "s", "m", "h",
                                                      "."] + values)
write("kubeconfig", ["current-context:", "clusters:", "contexts:", "users:", "name:", "cluster:", "context:", "user:",
                     "server:", "https://", "certificate-authority:", "certificate-authority-data:",
                     "insecure-skip-tls-verify:", "tls-server-name:", "proxy-url:", "token:", "tokenFile:",
                     "client-certificate:", "client-certificate-data:", "client-key:", "client-key-data:",
                     "username:", "password:", "exec:", "auth-provider:", "as:", "- ", "[", "]", "{", "}", "null",
                     "true", "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"])
cni = ["CNI_COMMAND=", "ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "CNI_CONTAINERID=", "CNI_IFNAME=",
       "CNI_ARGS=", "\0\0"]
cni += ['"' + k + '":' for k in ["cniVersion", "prevResult", "runtimeConfig", "io.kubernetes.cri.pod-annotations",
                                 "ips", "address", "version", "interfaces", "log_level", "iptables_mode",
                                 "exclude_namespaces", "installer_pods", "namespace", "name_prefix", "api_timeout",
                                 "default_namespace", "consul_status_annotation", "cni.dev/valid-attachments",
                                 "containerID", "ifname", "multus"] + consul_keys + kuma_keys]
cni += ['"0.3.0"', '"0.3.1"', '"0.4.0"', '"1.0.0"', '"1.1.0"', '"nft"', '"legacy"', '"debug"']
write("cni_invocation", cni)
write("conflist_merge", ['"' + k + '":' for k in ["cniVersion", "name", "plugins", "type", "capabilities",
                                                  "ipam", "delegate", "runtimeConfig"]]
      + ['"tproxy-cni"', '"consul-cni"', '"kuma-cni"', '"istio-cni"', '"bridge"', '"portmap"', '"0.3.1"',
         '"1.0.0"', '"1.1.0"', '"0.2.0"', "\0", "\1", "[", "]", "{", "}", "null", '""'])
