//! The handler's C, in `native/`: memcpy, memmove, memcmp and bcmp for the static musl build.
//!
//! musl's own copy with a microcoded `rep movs` (backwards, a byte at a time) and compare a
//! byte at a time; a sync copies and compares many short strings (JSON, SQLite records, map
//! keys), and in the packaged binary they took a fifth of its CPU. `build.rs` compiles
//! `native/mem.c` and, for musl, makes its functions the process's. Nothing here is called from
//! Rust: these tests hold the C to what the C library promises, on every target.

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::ffi::{c_int, c_void};

    unsafe extern "C" {
        fn func_sync_memmove(dst: *mut c_void, src: *const c_void, n: usize) -> *mut c_void;
        fn func_sync_memcmp(left: *const c_void, right: *const c_void, n: usize) -> c_int;
    }

    #[test]
    fn memmove_copies_every_length_in_both_directions_of_overlap() {
        let fresh: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in 0..=200 {
            for from in (0..60).filter(|f| f + n <= 300) {
                for to in (0..60).filter(|t| t + n <= 300) {
                    let mut moved = fresh.clone();
                    let base = moved.as_mut_ptr();
                    // SAFETY: both ranges lie inside `moved`; memmove allows them to overlap.
                    let returned =
                        unsafe { func_sync_memmove(base.add(to).cast(), base.add(from).cast(), n) };
                    assert_eq!(returned, unsafe { base.add(to) }.cast());
                    let mut expected = fresh.clone();
                    expected.copy_within(from..from + n, to);
                    assert!(moved == expected, "n={n} from={from} to={to}");
                }
            }
        }
    }

    #[test]
    fn memcmp_orders_by_the_first_differing_byte_as_unsigned() {
        let mut seed: u64 = 11;
        let mut next = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize
        };
        for _ in 0..100_000 {
            let n = next() % 100;
            // Bytes on both sides of 0x80, where a signed comparison would go wrong.
            let left: Vec<u8> = (0..n)
                .map(|_| [0x01, 0x7f, 0x80, 0xff][next() % 4])
                .collect();
            let mut right = left.clone();
            if n > 0 && next() % 4 != 0 {
                let at = next() % n;
                right[at] = [0x00, 0x7f, 0x81, 0xfe][next() % 4];
            }
            // SAFETY: both buffers hold `n` bytes.
            let found = unsafe { func_sync_memcmp(left.as_ptr().cast(), right.as_ptr().cast(), n) };
            assert_eq!(
                found.signum(),
                left.cmp(&right) as c_int,
                "{left:?} {right:?}"
            );
        }
    }
}
