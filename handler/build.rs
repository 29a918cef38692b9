//! Compiles `native/mem.c`: memcpy, memmove, memcmp and bcmp that take the place of musl's in
//! the static build (under their own names elsewhere, for the tests). See the file for why.

fn main() {
    println!("cargo:rerun-if-changed=native/mem.c");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        return;
    }
    let mut build = cc::Build::new();
    build
        .file("native/mem.c")
        .opt_level(2)
        // Keeps the compiler from turning the copy loops into calls to memcpy itself.
        .flag("-fno-builtin")
        .flag_if_supported("-fno-tree-loop-distribute-patterns");
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl") {
        build.define("REPLACE_LIBC", None);
    }
    build.compile("func_sync_mem");
}
