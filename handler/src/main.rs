//! The `handler` binary: see [`handler::cli`].

use std::ffi::{c_int, c_void};
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

/// SQLite's own allocations (statements, records, the page cache) go to mimalloc too: left
/// alone, SQLite calls the C library's allocator and takes a global lock around every call to
/// keep memory statistics nothing reads.
fn sqlite_allocates_with_mimalloc() {
    use libmimalloc_sys::{mi_free, mi_malloc, mi_realloc, mi_usable_size};
    use rusqlite::ffi::{
        SQLITE_CONFIG_MALLOC, SQLITE_CONFIG_MEMSTATUS, SQLITE_OK, sqlite3_config,
        sqlite3_mem_methods,
    };
    // SAFETY (all five): SQLite passes sizes above zero and pointers these functions returned.
    unsafe extern "C" fn malloc(size: c_int) -> *mut c_void {
        unsafe { mi_malloc(size as usize) }
    }
    unsafe extern "C" fn free(block: *mut c_void) {
        unsafe { mi_free(block) }
    }
    unsafe extern "C" fn realloc(block: *mut c_void, size: c_int) -> *mut c_void {
        unsafe { mi_realloc(block, size as usize) }
    }
    unsafe extern "C" fn size(block: *mut c_void) -> c_int {
        unsafe { mi_usable_size(block) as c_int }
    }
    unsafe extern "C" fn roundup(size: c_int) -> c_int {
        (size + 7) & !7
    }
    unsafe extern "C" fn init(_: *mut c_void) -> c_int {
        SQLITE_OK
    }
    unsafe extern "C" fn shutdown(_: *mut c_void) {}
    let methods = sqlite3_mem_methods {
        xMalloc: Some(malloc),
        xFree: Some(free),
        xRealloc: Some(realloc),
        xSize: Some(size),
        xRoundup: Some(roundup),
        xInit: Some(init),
        xShutdown: Some(shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: called before any database is opened, as `sqlite3_config` must be; SQLite copies
    // the methods before it returns. Should it refuse, it keeps its own allocator.
    unsafe {
        sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0 as c_int);
        sqlite3_config(SQLITE_CONFIG_MALLOC, &methods as *const sqlite3_mem_methods);
    }
}

fn main() -> ExitCode {
    // mimalloc's own MIMALLOC_PURGE_DELAY, when set, is the operator's choice.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 2) };
    }
    sqlite_allocates_with_mimalloc();
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
