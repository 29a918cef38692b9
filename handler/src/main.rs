//! The `handler` binary: see [`handler::cli`].

use std::process::ExitCode;

use clap::Parser;

use handler::cli::{self, Cli};
use handler::settings::Settings;

/// A sync allocates and frees a few small values per field of every record it reads. The
/// system allocators are slow at that: glibc's takes a lock per call and hoards freed memory
/// per thread, and the static musl build this app ships as has a much slower one still.
/// mimalloc is built without transparent huge pages (which make a few live bytes cost 2 MiB
/// of memory), and told to return freed memory after 2 ms instead of 1 s (see `main`): a
/// 100,000-record sync then stays under 50 MB, for a few percent of its time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the Rust bindings name the options
/// of mimalloc 2 only): milliseconds before freed memory is returned to the system.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // mimalloc's own MIMALLOC_PURGE_DELAY, when set, is the operator's choice.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 2) };
    }
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(cli::run(cli, settings));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
