//! Chaining our entry into the network configuration the runtime uses.
//!
//! The runtime (containerd, CRI-O, through libcni) loads the lexically first *valid* file ending in
//! `.conf`, `.conflist` or `.json` in its conf dir; [`scan`] picks that same file. [`inject`] returns
//! the primary's document with our entry appended last (an older entry of ours removed first), or
//! the single-plugin `.conf` turned into a list; [`strip`] takes our entry out again. Everything the
//! primary CNI wrote — keys we do not know, values, key order — is kept: documents are handled as
//! `serde_json::Value` with `preserve_order`, and we only ever touch the `plugins` array.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::plugin::version::Version;

/// The `type` of our entry; any plugin entry of this type is ours.
pub const PLUGIN_TYPE: &str = "tproxy-cni";

/// Other meshes' CNI plugins: chained together with us, a pod would be redirected twice.
const RIVAL_TYPES: [&str; 3] = ["consul-cni", "kuma-cni", "istio-cni"];

/// How long a broken file that sorts first is presumed to be mid-write by the primary CNI.
pub const SETTLE: Duration = Duration::from_secs(2);

/// The two shapes a network configuration file has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A `.conflist`: `{"name", "cniVersion", "plugins": [...]}`.
    List,
    /// A `.conf` or `.json`: one plugin's configuration.
    Single,
}

/// The file the runtime uses, read and parsed.
#[derive(Debug, Clone)]
pub struct Primary {
    pub path: PathBuf,
    pub shape: Shape,
    /// The file's bytes as read.
    pub bytes: Vec<u8>,
    pub doc: Value,
}

/// What the conf dir holds, as the runtime would see it.
#[derive(Debug)]
pub enum Scan {
    /// The file the runtime loads.
    Found(Primary),
    /// No valid configuration at all (yet): the primary CNI has not written one.
    Nothing,
    /// The first candidate is unreadable but was modified moments ago: probably mid-write. Look again
    /// shortly rather than pick a later file the runtime will not use once this one is complete.
    Unsettled(PathBuf),
}

/// Why a document cannot be chained into.
#[derive(Debug, Error)]
pub enum ChainError {
    #[error(
        "{path}: cniVersion {} is not one tproxy-cni supports, so the runtime could not call it; the primary CNI must write cniVersion 0.3.0 or later",
        crate::text::Quoted::new(version)
    )]
    Version { path: PathBuf, version: String },
}

/// Lists the candidates in the order the runtime tries them: by file name, bytewise.
pub fn candidates(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.ends_with(".conf") || name.ends_with(".conflist") || name.ends_with(".json")) {
            continue;
        }
        // libcni reads what the name points to; directories are skipped.
        if fs::metadata(entry.path()).map(|m| m.is_file()).unwrap_or(false) {
            out.push(entry.path());
        }
    }
    out.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(out)
}

/// Finds the file the runtime uses. `now` is compared with modification times to tell a file being
/// written from a broken one.
pub fn scan(dir: &Path, now: SystemTime) -> io::Result<Scan> {
    for path in candidates(dir)? {
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // replaced under us
            Err(e) => return Err(e),
        };
        let shape = if path.extension().is_some_and(|e| e == "conflist") { Shape::List } else { Shape::Single };
        match parse(&bytes, shape) {
            Ok(doc) => return Ok(Scan::Found(Primary { path, shape, bytes, doc })),
            Err(why) => {
                let recent = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() < SETTLE)
                    .unwrap_or(false);
                if recent {
                    return Ok(Scan::Unsettled(path));
                }
                log::debug!(
                    "{} is not a valid network configuration ({why}); the runtime skips it too",
                    path.display()
                );
            }
        }
    }
    Ok(Scan::Nothing)
}

/// Checks a document the way libcni does before the runtime uses it.
pub fn parse(bytes: &[u8], shape: Shape) -> Result<Value, &'static str> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|_| "not JSON")?;
    // Numbers keep their text (serde_json's arbitrary_precision), so a value is written back as the
    // primary wrote it; libcni reads every number as a float64 and refuses the file when one does
    // not fit, and so do we, to pick the file the runtime uses.
    if !numbers_fit_f64(&doc) {
        return Err("a number beyond the range of a float64");
    }
    let obj = doc.as_object().ok_or("not a JSON object")?;
    match shape {
        Shape::List => {
            obj.get("name").and_then(Value::as_str).ok_or("no name")?;
            let plugins = obj.get("plugins").and_then(Value::as_array).ok_or("no plugins list")?;
            if plugins.is_empty() {
                return Err("empty plugins list");
            }
            if !plugins.iter().all(|p| p.get("type").and_then(Value::as_str).is_some_and(|t| !t.is_empty())) {
                return Err("a plugin has no type");
            }
        }
        Shape::Single => {
            if obj.get("type").and_then(Value::as_str).is_none_or(str::is_empty) {
                return Err("no type");
            }
        }
    }
    Ok(doc)
}

fn numbers_fit_f64(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64().is_some(),
        Value::Array(items) => items.iter().all(numbers_fit_f64),
        Value::Object(map) => map.values().all(numbers_fit_f64),
        _ => true,
    }
}

/// The path our chained list is written to: the primary's own for a list, `.conflist` for a `.conf`.
pub fn list_path(primary: &Path, shape: Shape) -> PathBuf {
    match shape {
        Shape::List => primary.to_path_buf(),
        Shape::Single => primary.with_extension("conflist"),
    }
}

/// Is this plugin entry ours?
pub fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Does the list document end with exactly `entry`?
pub fn has_entry(doc: &Value, entry: &Value) -> bool {
    doc.get("plugins").and_then(Value::as_array).and_then(|p| p.last()).is_some_and(|last| last == entry)
}

/// Does the list document hold any entry of ours?
pub fn has_any_entry(doc: &Value) -> bool {
    doc.get("plugins").and_then(Value::as_array).is_some_and(|p| p.iter().any(is_ours))
}

/// The primary's document as a list, with `entry` last and no other entry of ours.
///
/// Returns `None` when the document already is exactly that (nothing to write).
pub fn inject(primary: &Primary, entry: &Value) -> Result<Option<Value>, ChainError> {
    let list = match primary.shape {
        Shape::List => primary.doc.clone(),
        Shape::Single => single_to_list(&primary.doc),
    };
    check_version(&primary.path, &list)?;
    if primary.shape == Shape::List && count_ours(&list) == 1 && has_entry(&list, entry) {
        return Ok(None);
    }
    let mut out = list;
    let plugins = out.get_mut("plugins").and_then(Value::as_array_mut).expect("checked by parse");
    plugins.retain(|p| !is_ours(p));
    for p in plugins.iter() {
        if let Some(t) = p.get("type").and_then(Value::as_str).filter(|t| RIVAL_TYPES.contains(t)) {
            log::warn!(
                "the chain in {} also holds {t}: pods would be redirected twice; remove it",
                primary.path.display()
            );
        }
    }
    plugins.push(entry.clone());
    Ok(Some(out))
}

/// The list document without any entry of ours, or `None` when it holds none.
pub fn strip(doc: &Value) -> Option<Value> {
    if !has_any_entry(doc) {
        return None;
    }
    let mut out = doc.clone();
    out.get_mut("plugins").and_then(Value::as_array_mut)?.retain(|p| !is_ours(p));
    Some(out)
}

/// libcni's conversion of a single-plugin configuration into a list: the plugin keeps every key,
/// and the list takes its `cniVersion` and `name`.
pub fn single_to_list(conf: &Value) -> Value {
    let mut list = Map::new();
    if let Some(v) = conf.get("cniVersion") {
        list.insert("cniVersion".into(), v.clone());
    }
    list.insert("name".into(), conf.get("name").cloned().unwrap_or_else(|| Value::String(String::new())));
    list.insert("plugins".into(), Value::Array(vec![conf.clone()]));
    Value::Object(list)
}

/// The bytes we write for a document: two-space indentation and a final newline.
pub fn render(doc: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(doc).expect("a Value always serialises");
    out.push(b'\n');
    out
}

fn count_ours(doc: &Value) -> usize {
    doc.get("plugins").and_then(Value::as_array).map_or(0, |p| p.iter().filter(|p| is_ours(p)).count())
}

/// The runtime passes the list's cniVersion to every plugin; one we do not speak would fail every pod.
fn check_version(path: &Path, list: &Value) -> Result<(), ChainError> {
    let version = list.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    match version.parse::<Version>() {
        Ok(_) => Ok(()),
        Err(_) => Err(ChainError::Version { path: path.to_path_buf(), version: version.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({"type": "tproxy-cni", "name": "tproxy-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true}})
    }

    fn primary(shape: Shape, text: &str) -> Primary {
        let bytes = text.as_bytes().to_vec();
        Primary { path: PathBuf::from("/x/10-a.conflist"), shape, doc: parse(&bytes, shape).unwrap(), bytes }
    }

    #[test]
    fn validates_like_libcni() {
        assert!(parse(br#"{"name":"n","plugins":[{"type":"bridge"}]}"#, Shape::List).is_ok());
        assert_eq!(parse(br#"{"plugins":[{"type":"bridge"}]}"#, Shape::List), Err("no name"));
        assert_eq!(parse(br#"{"name":"n","plugins":[]}"#, Shape::List), Err("empty plugins list"));
        assert_eq!(parse(br#"{"name":"n","plugins":[{"type":""}]}"#, Shape::List), Err("a plugin has no type"));
        assert_eq!(parse(br#"{"name":"n"}"#, Shape::Single), Err("no type"));
        assert_eq!(parse(b"{", Shape::Single), Err("not JSON"));
        assert_eq!(parse(b"[1]", Shape::Single), Err("not a JSON object"));
    }

    #[test]
    fn appends_last_and_keeps_unknown_keys_in_order() {
        let p = primary(
            Shape::List,
            r#"{"zeta":1,"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","z":true,"a":{"y":1,"b":2}}],"alpha":[3]}"#,
        );
        let out = inject(&p, &entry()).unwrap().unwrap();
        let text = serde_json::to_string(&out).unwrap();
        assert!(
            text.starts_with(
                r#"{"zeta":1,"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","z":true,"a":{"y":1,"b":2}},{"type":"tproxy-cni""#
            ),
            "{text}"
        );
        assert!(text.ends_with(r#"}}],"alpha":[3]}"#), "{text}");
    }

    #[test]
    fn an_existing_exact_entry_means_nothing_to_write() {
        let mut doc: Value =
            serde_json::from_str(r#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"bridge"}]}"#).unwrap();
        doc["plugins"].as_array_mut().unwrap().push(entry());
        let p = primary(Shape::List, &doc.to_string());
        assert!(inject(&p, &entry()).unwrap().is_none());
    }

    #[test]
    fn replaces_an_older_entry_of_ours_wherever_it_is() {
        let p = primary(
            Shape::List,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"tproxy-cni","log_level":"debug"},{"type":"portmap"}]}"#,
        );
        let out = inject(&p, &entry()).unwrap().unwrap();
        let types: Vec<_> = out["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["bridge", "portmap", "tproxy-cni"]);
        assert_eq!(out["plugins"][2], entry());
    }

    #[test]
    fn converts_a_single_plugin_conf_into_a_list() {
        let p = primary(
            Shape::Single,
            r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"isDefaultGateway":true}}"#,
        );
        let out = inject(&p, &entry()).unwrap().unwrap();
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            format!(
                r#"{{"cniVersion":"0.3.1","name":"cbr0","plugins":[{{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{{"isDefaultGateway":true}}}},{}]}}"#,
                entry()
            )
        );
        assert_eq!(list_path(Path::new("/d/10-flannel.conf"), Shape::Single), Path::new("/d/10-flannel.conflist"));
    }

    #[test]
    fn refuses_a_version_the_plugin_cannot_speak() {
        for bad in [r#""cniVersion":"0.2.0","#, ""] {
            let p = primary(Shape::List, &format!(r#"{{{bad}"name":"n","plugins":[{{"type":"bridge"}}]}}"#));
            assert!(matches!(inject(&p, &entry()), Err(ChainError::Version { .. })), "{bad}");
        }
    }

    #[test]
    fn strip_removes_exactly_our_entries() {
        let doc = json!({"name":"n","plugins":[{"type":"bridge"},{"type":"tproxy-cni"},{"type":"portmap"}],"k":1});
        assert_eq!(strip(&doc).unwrap(), json!({"name":"n","plugins":[{"type":"bridge"},{"type":"portmap"}],"k":1}));
        assert!(strip(&json!({"name":"n","plugins":[{"type":"bridge"}]})).is_none());
    }
}
