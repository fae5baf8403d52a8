//! The folders of `src/` depend on each other in one direction only (`docs/architecture.md`, "The
//! house"). This test reads every source file, finds each path into another top folder
//! (`crate::kernel::…`, `crate::{core::…, kube}`, or a `super::` chain that climbs out of its own
//! folder) and fails naming the file and line of every one the allowed order does not list.
//!
//! Comments and string literals are left out: a doc link to another folder is documentation, not
//! a dependency. `main.rs` and `lib.rs` are the crate's root and may name every folder; a macro
//! exported at the root (`crate::kuma_comment!`) belongs to no folder.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The top folders and top files of `src/` a path can lead into.
const FOLDERS: [&str; 9] = ["cli", "core", "host", "installer", "kernel", "kube", "log", "plugin", "text"];

/// Whom each folder may use, besides itself. `text` and `log` (the logger's backend) are for
/// every folder but `core`, which stays pure: it writes no log of its own (it may emit records
/// through the `log` facade, which is not `crate::log`). `kube` uses `core::limits` only.
fn allowed(from: &str) -> &'static [&'static str] {
    match from {
        "cli" => &["host", "installer", "core", "text", "log"],
        "installer" => &["plugin", "kube", "text", "log"],
        "host" => &["kernel", "core", "text", "log"],
        "plugin" => &["kernel", "kube", "core", "text", "log"],
        "kernel" => &["core", "text", "log"],
        "kube" => &["core", "text", "log"],
        "core" => &["text"],
        "text" | "log" => &[],
        other => panic!("unknown top folder {other}"),
    }
}

/// The unit tests' scratch-directory guard (`src/test_dir.rs`, compiled for tests only): any
/// folder's tests may use it, and it uses no folder. Like the crate root, it is no folder of the
/// table.
const TEST_ONLY: &str = "test_dir";

/// Paths into `core` that `kube` may take.
const KUBE_MAY_USE_OF_CORE: &str = "limits";

/// One reference from a file into a top folder.
#[derive(Debug)]
struct Reference {
    file: PathBuf,
    line: usize,
    to: String,
    /// The path's segment after the folder (`limits` in `crate::core::limits::X`), if any.
    next: Option<String>,
}

#[test]
fn folders_depend_in_one_direction_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    let files = rust_files(&src);
    assert!(files.len() > 40, "found only {} source files under {}", files.len(), src.display());
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let from = top_folder(rel);
        if from == "main" || from == "lib" || from == TEST_ONLY {
            continue;
        }
        assert!(FOLDERS.contains(&from.as_str()), "{}: a top folder the test does not know", rel.display());
        let text = fs::read_to_string(&file).unwrap();
        for r in references(rel, &code_only(&text)) {
            // A macro exported at the crate root (`crate::kuma_comment!`) is not a folder.
            if r.to == from || !FOLDERS.contains(&r.to.as_str()) {
                continue;
            }
            *edges.entry((from.clone(), r.to.clone())).or_default() += 1;
            let ok = allowed(&from).contains(&r.to.as_str())
                && !(from == "kube" && r.to == "core" && r.next.as_deref() != Some(KUBE_MAY_USE_OF_CORE));
            if !ok {
                wrong.push(format!(
                    "src/{}:{}: {from} uses {}{} — {from} may use only {:?}{}",
                    r.file.display(),
                    r.line,
                    r.to,
                    r.next.map(|n| format!("::{n}")).unwrap_or_default(),
                    allowed(&from),
                    if from == "kube" { " (of core, limits only)" } else { "" },
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the folders' direction (docs/architecture.md); move the code, or if the edge is \
         right, draw it in the diagram there and add it to `allowed` here:\n{}",
        wrong.join("\n")
    );
    // The test must see the edges the layout is made of, or it checks nothing.
    for edge in [("plugin", "core"), ("plugin", "kernel"), ("kernel", "core"), ("installer", "plugin")] {
        assert!(edges.contains_key(&(edge.0.into(), edge.1.into())), "no {edge:?} reference found: {edges:?}");
    }
}

#[test]
fn the_reader_finds_every_form_of_path_and_skips_comments_and_strings() {
    let text = r#"
use crate::core::limits;
use crate::{kernel::netns::Netns, kube};
use super::super::host::Report; // crate::installer in a comment
/// [`crate::plugin::run`] in a doc comment
let s = "crate::cli in a string"; let c = '"'; let q = '\''; let r = r"crate::log";
fn f<'a>(x: &'a str) -> crate::text::Quoted { crate::text::Quoted::new(x) }
mod tests { use super::super::Thing; }
/* crate::host
   /* nested */ crate::host */
"#;
    let found: Vec<(usize, String, Option<String>)> =
        references(Path::new("plugin/pod.rs"), &code_only(text)).into_iter().map(|r| (r.line, r.to, r.next)).collect();
    let want = [
        (2, "core", Some("limits")),
        (3, "kernel", Some("netns")),
        (3, "kube", None),
        (4, "host", Some("Report")),
        (7, "text", Some("Quoted")),
        (7, "text", Some("Quoted")),
    ];
    let want: Vec<(usize, String, Option<String>)> =
        want.iter().map(|(l, t, n)| (*l, t.to_string(), n.map(str::to_owned))).collect();
    assert_eq!(found, want);
    // `super::super` from `plugin/pod.rs` leaves the folder; inside an inline module it takes one
    // more `super` to climb as far.
    let climbs = references(Path::new("plugin/pod.rs"), &code_only("mod t { use super::super::super::x; }"));
    assert_eq!(climbs.iter().map(|r| r.to.as_str()).collect::<Vec<_>>(), ["x"]);
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `core` for `core/mesh/mod.rs`, `text` for `text.rs`.
fn top_folder(rel: &Path) -> String {
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy();
    first.strip_suffix(".rs").unwrap_or(&first).to_owned()
}

/// The module path of a file (`plugin/pod.rs` → `[plugin, pod]`, `core/mesh/mod.rs` → `[core,
/// mesh]`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    if last != "mod.rs" {
        parts.push(last.trim_end_matches(".rs").to_owned());
    }
    parts
}

/// The source with comments and the contents of string and character literals blanked out; line
/// breaks are kept, so line numbers stay right.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    // Blanks `b[from..to]`, keeping line breaks.
    let blank = |out: &mut String, from: usize, to: usize| {
        out.extend(b[from..to.min(b.len())].iter().map(|&c| if c == b'\n' { '\n' } else { ' ' }));
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some((open, hashes)) = raw_string_start(b, i) {
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let body = i + open;
            let end =
                b[body..].windows(close.len()).position(|w| w == close).map_or(b.len(), |p| body + p + close.len());
            out.push_str("\"\"");
            blank(&mut out, i + 2, end);
            i = end;
        } else if b[i] == b'"' || (b[i] == b'b' && rest.get(1) == Some(&b'"') && !ident_before(b, i)) {
            let mut j = i + if b[i] == b'b' { 2 } else { 1 };
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            blank(&mut out, i + 2, j + 1);
            i = j + 1;
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\u{1F600}', '"'), or a lifetime ('a), left as is.
            let end = if rest.get(1) == Some(&b'\\') {
                // The escaped character comes first, so a quote there does not close.
                b.get(i + 3..).and_then(|t| t.iter().position(|&c| c == b'\'')).map(|p| i + 3 + p + 1)
            } else {
                let ch = text[i + 1..].chars().next().map_or(0, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(i + 1 + ch + 1)
            };
            match end {
                Some(end) => {
                    out.push_str("' '");
                    blank(&mut out, i + 3, end);
                    i = end;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Is a byte before `i` part of an identifier (so `b"` there is not a byte string)?
fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// At `i`, a raw string (`r"`, `r#"`, `br##"`…): the length of its opening and its number of `#`.
fn raw_string_start(b: &[u8], i: usize) -> Option<(usize, usize)> {
    if ident_before(b, i) {
        return None;
    }
    let mut j = i;
    if b.get(j) == Some(&b'b') {
        j += 1;
    }
    if b.get(j) != Some(&b'r') {
        return None;
    }
    j += 1;
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    (b.get(j + hashes) == Some(&b'"')).then_some((j + hashes + 1 - i, hashes))
}

/// Every path in `code` that leads into a top folder other than by `self`.
fn references(rel: &Path, code: &str) -> Vec<Reference> {
    let module = module_path(rel);
    let mut out = Vec::new();
    // Inline `mod name {` blocks open so far, by the brace depth they close at.
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let b = code.as_bytes();
    let mut i = 0;
    let mut line = 1;
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            _ => {}
        }
        if ident_before(b, i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        if let Some(after) = rest.strip_prefix("mod ") {
            let name_len = after.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(after.len());
            if after[name_len..].trim_start().starts_with('{') {
                inline.push(depth);
            }
        } else if let Some(after) = rest.strip_prefix("crate::") {
            for (to, next) in targets(after) {
                out.push(Reference { file: rel.to_owned(), line, to, next });
            }
        } else if rest.starts_with("super::") {
            let mut ups = 0usize;
            let mut after = rest;
            while let Some(a) = after.strip_prefix("super::") {
                ups += 1;
                after = a;
            }
            // Inside inline modules, the first `super`s climb out of them.
            let ups_past_file = ups.saturating_sub(inline.len());
            if ups > inline.len() && ups_past_file >= module.len() {
                for (to, next) in targets(after) {
                    out.push(Reference { file: rel.to_owned(), line, to, next });
                }
            }
            i += rest.len() - after.len();
            continue;
        }
        i += 1;
    }
    out
}

/// What a path leads into after `crate::`: one folder (`kernel::netns::X` → kernel, netns), or
/// each member of a group (`{core::limits, kube}`).
fn targets(after: &str) -> Vec<(String, Option<String>)> {
    let ident = |s: &str| -> (String, usize) {
        let n = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
        (s[..n].to_owned(), n)
    };
    let one = |s: &str| -> Option<(String, Option<String>)> {
        let s = s.trim_start();
        let (name, n) = ident(s);
        if name.is_empty() || name == "self" {
            return None;
        }
        let next = s[n..].trim_start().strip_prefix("::").map(|r| ident(r.trim_start()).0).filter(|n| !n.is_empty());
        Some((name, next))
    };
    let Some(group) = after.strip_prefix('{') else { return one(after).into_iter().collect() };
    // The group's members at its top level: split on commas outside nested braces.
    let mut members = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (k, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                members.push(&group[start..k]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                members.push(&group[start..k]);
                start = k + 1;
            }
            _ => {}
        }
    }
    members.into_iter().filter_map(one).collect()
}
