//! Entry point: CNI mode when the runtime set `CNI_COMMAND`, otherwise the command line.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;

/// The plugin lives for a millisecond and makes a few hundred small allocations. musl's
/// allocator (the shipped binary links musl statically) maps and unmaps a page for many of them;
/// dlmalloc takes its memory in 64 KiB segments and keeps what is freed (docs/performance.md).
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> ExitCode {
    let env: HashMap<String, String> =
        std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
    if env.contains_key("CNI_COMMAND") {
        tproxy_cni::log::init(log::LevelFilter::Warn);
        // Room for a usual configuration at once: two reads instead of a doubling series of small ones.
        let mut stdin = Vec::with_capacity(16 * 1024);
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            log::warn!("cannot read stdin: {e}");
        }
        let outcome = tproxy_cni::plugin::run(&env, &stdin);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(outcome.stdout.as_bytes());
        let _ = out.flush();
        return ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1));
    }
    tproxy_cni::cli::main()
}
