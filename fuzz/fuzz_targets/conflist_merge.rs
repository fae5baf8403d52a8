//! The installer's conflist merger (`install::conflist`): the primary CNI's configuration file, as
//! the runtime would read it, with our entry chained in and taken out again.
//!
//! The first byte chooses the file's shape (`.conflist` or a single-plugin `.conf`); the rest is
//! the file. When the runtime would accept the file, chaining must: end the list with exactly our
//! entry, once; keep every other plugin entry, in order, value for value, and every other key of
//! the document; write a file the runtime accepts and that reads back as the same document; be
//! idempotent (chaining the result again changes nothing); and removing our entry must give back
//! exactly the primary's own plugins, after which there is nothing left to remove.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use tproxy_cni::installer::conflist::{self, Primary, Shape};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    let shape = if which & 1 == 0 { Shape::List } else { Shape::Single };
    let Ok(doc) = conflist::parse(bytes, shape) else { return };
    let entry = json!({"type": "tproxy-cni", "name": "tproxy-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true}});
    let primary =
        Primary { path: PathBuf::from("/etc/cni/net.d/10-primary.conflist"), shape, bytes: bytes.to_vec(), doc };
    let list = match shape {
        Shape::List => primary.doc.clone(),
        Shape::Single => conflist::single_to_list(&primary.doc),
    };
    let theirs: Vec<Value> =
        list["plugins"].as_array().unwrap().iter().filter(|p| !conflist::is_ours(p)).cloned().collect();
    let out = match conflist::inject(&primary, &entry) {
        Err(e) => {
            tproxy_cni_fuzz::check_message(&e.to_string().replace('\n', " "));
            return;
        }
        Ok(None) => {
            assert_eq!(shape, Shape::List);
            assert!(conflist::has_entry(&list, &entry), "nothing to write, yet our entry is not last");
            list.clone()
        }
        Ok(Some(out)) => out,
    };
    let plugins = out["plugins"].as_array().expect("a plugins list");
    assert_eq!(plugins.last(), Some(&entry), "our entry is last");
    assert_eq!(plugins.iter().filter(|p| conflist::is_ours(p)).count(), 1, "exactly one entry of ours");
    assert_eq!(&plugins[..plugins.len() - 1], theirs.as_slice(), "the primary's plugins, in order, unchanged");
    for (k, v) in list.as_object().unwrap() {
        if k != "plugins" {
            assert_eq!(out.get(k), Some(v), "key {k} kept");
        }
    }
    let written = conflist::render(&out);
    let read_back = conflist::parse(&written, Shape::List).expect("the runtime accepts what we write");
    assert_eq!(read_back, out, "what we write reads back as the same document");
    let again = Primary { path: primary.path.clone(), shape: Shape::List, bytes: written, doc: read_back };
    assert!(matches!(conflist::inject(&again, &entry), Ok(None)), "chaining twice changes nothing");
    let stripped = conflist::strip(&out).expect("our entry is there to remove");
    assert_eq!(stripped["plugins"].as_array().unwrap(), &theirs, "removing gives back the primary's plugins");
    assert!(conflist::strip(&stripped).is_none(), "nothing of ours is left");
});
