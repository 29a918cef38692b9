//! Fingerprints as the documents spell them: FNV-1a, 64 bits, over a text, written as 16
//! lowercase hex digits. A record's data, a shard's content and a field's value are
//! fingerprinted this way; the stored fingerprints are compared across versions, so the
//! function and its spelling never change.

/// FNV-1a as an `io::Write` sink, so a serializer can stream a canonical text into it
/// without building the text.
pub struct Fnv1a(u64);

impl Fnv1a {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    /// The hash of what was written, as [`hex16`] spells it.
    pub fn hex(&self) -> String {
        hex16(self.0)
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

impl std::io::Write for Fnv1a {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `n` as 16 lowercase hex digits: what `format!("{n:016x}")` writes, without the formatting
/// machinery (a sync writes several per record).
pub fn hex16(n: u64) -> String {
    let mut text = String::with_capacity(16);
    push_hex16(&mut text, n);
    text
}

/// Appends [`hex16`]'s spelling of `n` to `text`.
pub fn push_hex16(text: &mut String, n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    text.extend(
        (0..16)
            .rev()
            .map(|i| char::from(DIGITS[((n >> (i * 4)) & 0xf) as usize])),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hex16_writes_what_format_writes() {
        for n in [0, 1, 0xabc, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(hex16(n), format!("{n:016x}"));
        }
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        // The FNV-1a 64 test vectors: "" and "a".
        assert_eq!(Fnv1a::new().hex(), "cbf29ce484222325");
        let mut hash = Fnv1a::new();
        hash.write_all(b"a").unwrap();
        assert_eq!(hash.hex(), "af63dc4c8601ec8c");
    }
}
