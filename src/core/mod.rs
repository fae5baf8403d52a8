//! The pure core: from a pod's (or a host's) mesh configuration to the rules that redirect it.
//!
//! [`mesh`] reads each mesh's dialect (annotations, flags, configuration files) into a typed
//! [`redirect::Redirect`]; [`rules`] turns it into rules as data, per address family. Nothing here
//! does I/O, reads the environment or talks to the kernel: every function is a function of its
//! arguments, which is what the golden and fuzz tests rely on. [`limits`] bounds what one
//! configuration may ask for.

pub mod limits;
pub mod mesh;
pub mod nft;
pub mod redirect;
pub mod rules;
