//! Reading `iptables-save` output, and telling our rules and chains from everyone else's.
//!
//! Ownership is decided by marks, never by position: a chain is ours when its name is one of the
//! meshes' chain names we create; a rule is ours when it sits in such a chain, jumps to one, or
//! carries one of our comments: `tproxy-cni` (or `tproxy-cni/…`) on Consul's layout, Kuma's
//! `kuma/mesh/transparent/proxy/…` on Kuma's. Everything else is foreign and is never touched.
//!
//! Kuma's comment prefix is Kuma's own, so a rule that `kuma-init` installed would look like ours;
//! a namespace holds one Kuma layout, and a pod with `kuma-init` is never ours (`mesh::kuma`).

use crate::core::rules::{KUMA_COMMENT_PREFIX, OWNER_COMMENT};

/// Chain name prefixes of the layouts we install (Consul's, and Kuma's).
const OWNED_CHAIN_PREFIXES: &[&str] = &["CONSUL_PROXY_", "CONSUL_DNS_REDIRECT", "KUMA_MESH_"];

/// One table of a save dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    /// Every chain declared in the table (built-in and user-defined), in dump order.
    pub chains: Vec<String>,
    pub rules: Vec<SavedRule>,
}

/// One `-A CHAIN spec` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    pub spec: String,
}

/// Parses an `iptables-save` dump. Lines we do not understand are ignored: the format is stable
/// and we only act on chains and rules.
pub fn parse(dump: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    for line in dump.lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(SavedTable { name: name.trim().to_owned(), ..SavedTable::default() });
            continue;
        }
        let Some(t) = tables.last_mut() else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            t.chains.extend(decl.split_whitespace().next().map(str::to_owned));
        } else if let Some((chain, spec)) = line.strip_prefix("-A ").and_then(|r| r.split_once(' ')) {
            t.rules.push(SavedRule { chain: chain.to_owned(), spec: spec.to_owned() });
        }
    }
    tables
}

/// Is this rule comment one of ours? The exact mark, or the mark followed by `/` and more.
pub fn is_owner_comment(c: &str) -> bool {
    c.strip_prefix(OWNER_COMMENT).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        || c.strip_prefix(KUMA_COMMENT_PREFIX).is_some_and(|rest| !rest.is_empty())
}

pub fn is_owned_chain(name: &str) -> bool {
    OWNED_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

impl SavedRule {
    /// The `-j` target of the rule, if any.
    pub fn jump_target(&self) -> Option<String> {
        value_after(&self.spec, &["-j", "-g"])
    }

    fn has_owner_comment(&self) -> bool {
        value_after(&self.spec, &["--comment"]).is_some_and(|c| is_owner_comment(&c))
    }

    /// A rule of ours sitting in a chain that is not ours (a built-in chain, typically).
    pub fn is_owned_outside_our_chains(&self) -> bool {
        !is_owned_chain(&self.chain)
            && (self.jump_target().is_some_and(|t| is_owned_chain(&t)) || self.has_owner_comment())
    }

    /// Is this rule ours at all?
    pub fn is_owned(&self) -> bool {
        is_owned_chain(&self.chain) || self.is_owned_outside_our_chains()
    }

    /// A rule that sits in, or jumps to, a chain with one of our names but lacks our comment: the
    /// mesh's own tool (`consul connect redirect-traffic`, kuma-init, `kumactl install
    /// transparent-proxy`) installed it, not us. Every rule we install carries the comment.
    pub fn is_lookalike(&self) -> bool {
        (is_owned_chain(&self.chain) || self.jump_target().is_some_and(|t| is_owned_chain(&t)))
            && !self.has_owner_comment()
    }
}

/// The word following the first of `flags` in a rule spec, with iptables-save's quoting undone.
fn value_after(spec: &str, flags: &[&str]) -> Option<String> {
    let words = words(spec);
    let at = words.iter().position(|w| flags.contains(&w.as_str()))?;
    words.get(at + 1).cloned()
}

/// Splits a spec into words the way iptables-restore does: on spaces, with `"..."` kept whole.
fn words(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut in_word, mut escaped) = (false, false, false);
    for ch in spec.chars() {
        match ch {
            _ if escaped => {
                cur.push(ch);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

impl SavedTable {
    /// Our chains in this table.
    pub fn owned_chains(&self) -> impl Iterator<Item = &str> {
        self.chains.iter().map(String::as_str).filter(|c| is_owned_chain(c))
    }

    /// Our rules that live in chains that are not ours; removing them needs an explicit `-D`.
    pub fn owned_rules_outside(&self) -> impl Iterator<Item = &SavedRule> {
        self.rules.iter().filter(|r| r.is_owned_outside_our_chains())
    }

    /// Rules under our chain names that we did not install (see [`SavedRule::is_lookalike`]).
    pub fn lookalikes(&self) -> impl Iterator<Item = &SavedRule> {
        self.rules.iter().filter(|r| r.is_lookalike())
    }

    pub fn has_owned(&self) -> bool {
        self.owned_chains().next().is_some() || self.owned_rules_outside().next().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CANARY - [0:0]
-A OUTPUT -p tcp -m comment --comment tproxy-cni -j CONSUL_PROXY_OUTPUT
-A OUTPUT -p udp -j CANARY
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-A CANARY -m comment --comment \"tproxy-cni lookalike\" -j RETURN
-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -m comment --comment tproxy-cni -j RETURN
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
";

    #[test]
    fn parses_tables_chains_and_rules() {
        let t = parse(DUMP);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "nat");
        assert_eq!(t[0].chains, ["PREROUTING", "OUTPUT", "CONSUL_PROXY_OUTPUT", "CANARY"]);
        assert_eq!(t[0].rules.len(), 5);
        assert_eq!(t[0].rules[0].jump_target().as_deref(), Some("CONSUL_PROXY_OUTPUT"));
        assert!(!t[1].has_owned());
    }

    #[test]
    fn tells_our_rules_from_foreign_ones() {
        let t = &parse(DUMP)[0];
        assert_eq!(t.owned_chains().collect::<Vec<_>>(), ["CONSUL_PROXY_OUTPUT"]);
        let outside: Vec<_> = t.owned_rules_outside().map(|r| r.spec.as_str()).collect();
        // Both jumps into our chain are ours (one lacks our comment, but it jumps to our chain);
        // the canary's rule only looks like ours.
        assert_eq!(
            outside,
            ["-p tcp -m comment --comment tproxy-cni -j CONSUL_PROXY_OUTPUT", "-p tcp -j CONSUL_PROXY_OUTPUT"]
        );
        assert!(!t.rules[1].is_owned());
        assert!(!t.rules[3].is_owned());
        assert!(t.rules[4].is_owned());
    }

    #[test]
    fn finds_rules_under_our_names_that_we_did_not_install() {
        let t = &parse(DUMP)[0];
        // The unmarked jump into our chain; not the canary (foreign name), not our marked rules.
        assert_eq!(t.lookalikes().map(|r| r.spec.as_str()).collect::<Vec<_>>(), ["-p tcp -j CONSUL_PROXY_OUTPUT"]);
        let kuma = parse(
            "*nat\n:KUMA_MESH_OUTBOUND - [0:0]\n-A KUMA_MESH_OUTBOUND -p tcp -m comment --comment \"kuma/mesh/transparent/proxy/outbound\" -j RETURN\n-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND\nCOMMIT\n",
        );
        // Kuma's comment is one of our marks (we install Kuma's layout with Kuma's comments), so
        // only the uncommented jump, as an old kuma-init wrote it, is someone else's.
        assert_eq!(kuma[0].lookalikes().map(|r| r.spec.as_str()).collect::<Vec<_>>(), ["-p tcp -j KUMA_MESH_OUTBOUND"]);
    }

    #[test]
    fn kuma_rules_in_built_in_chains_are_ours_and_lookalikes_are_not() {
        let dump = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp -m udp --dport 53 -m comment --comment "kuma/mesh/transparent/proxy/zone 2" -j CT --zone 2
-A OUTPUT -p udp -m comment --comment "kuma/mesh/transparent/proxy" -j CT --zone 3
-A OUTPUT -p udp -m comment --comment "x kuma/mesh/transparent/proxy/y" -j CT --zone 4
-A OUTPUT -p udp -m comment --comment "tproxy-cnix" -j CT --zone 5
-A PREROUTING -m comment --comment "tproxy-cni/kuma" -j CT --zone 6
COMMIT
"#;
        let t = &parse(dump)[0];
        let ours: Vec<_> = t.owned_rules_outside().map(|r| r.spec.rsplit(' ').next().unwrap()).collect();
        assert_eq!(ours, ["2", "6"]);
        assert!(t.has_owned());
        assert!(t.owned_chains().next().is_none(), "built-in chains are never ours");
    }

    #[test]
    fn splits_quoted_words_like_iptables_restore() {
        assert_eq!(
            words(r#"-m comment --comment "a b \"c\"" -j X"#),
            ["-m", "comment", "--comment", r#"a b "c""#, "-j", "X"]
        );
        assert_eq!(words(r#"--comment """#), ["--comment", ""]);
    }
}
