/*
 * memcpy, memmove, memcmp and bcmp for the static musl build.
 *
 * musl's own are a microcoded `rep movsq` (dear for the short copies most of a sync's are),
 * a byte-at-a-time `rep movsb` backwards, and a byte loop for comparing: in the packaged
 * binary they took a fifth of a sync's CPU. These move and compare 16 bytes at a time with
 * SSE2, which every x86-64 has. With REPLACE_LIBC (the musl build) they are the process's;
 * otherwise only under their own names, for the tests.
 *
 * Built with -fno-builtin -fno-tree-loop-distribute-patterns, so that the compiler does not
 * turn these loops back into calls to themselves. No headers: musl-gcc's and the system's
 * differ, and nothing here needs one.
 */

typedef __SIZE_TYPE__ size_t;
typedef unsigned char bytes16 __attribute__((vector_size(16)));

static inline bytes16 load16(const unsigned char *p) {
    bytes16 v;
    __builtin_memcpy(&v, p, 16);
    return v;
}

static inline void store16(unsigned char *p, bytes16 v) { __builtin_memcpy(p, &v, 16); }

/* The first and last `w` bytes of `n` (w <= n <= 2w), both read before either is written,
   so overlap is safe. Always inlined with a constant `w`: the copies become single moves. */
static inline __attribute__((always_inline)) void move_ends(unsigned char *d,
                                                           const unsigned char *s, size_t n,
                                                           size_t w) {
    unsigned char head[8], tail[8];
    __builtin_memcpy(head, s, w);
    __builtin_memcpy(tail, s + n - w, w);
    __builtin_memcpy(d, head, w);
    __builtin_memcpy(d + n - w, tail, w);
}

/* Fewer than 16 bytes. */
static inline void move_short(unsigned char *d, const unsigned char *s, size_t n) {
    if (n >= 8) {
        move_ends(d, s, n, 8);
    } else if (n >= 4) {
        move_ends(d, s, n, 4);
    } else if (n >= 2) {
        move_ends(d, s, n, 2);
    } else if (n == 1) {
        *d = *s;
    }
}

void *func_sync_memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if ((size_t)(d - s) >= n) {
        /* Forwards: the destination starts below the source or after it ends, so a block
           written never covers source bytes not yet read. */
        size_t i = 0;
        for (; n - i >= 16; i += 16) {
            store16(d + i, load16(s + i));
        }
        move_short(d + i, s + i, n - i);
    } else {
        /* Backwards, for a destination that starts inside the source. */
        size_t r = n;
        while (r >= 16) {
            r -= 16;
            store16(d + r, load16(s + r));
        }
        move_short(d, s, r);
    }
    return dst;
}

int func_sync_memcmp(const void *left, const void *right, size_t n) {
    const unsigned char *l = left, *r = right;
    size_t i = 0;
    for (; n - i >= 16; i += 16) {
        bytes16 same = (bytes16)(load16(l + i) == load16(r + i));
        unsigned int mask = (unsigned int)__builtin_ia32_pmovmskb128((__attribute__((vector_size(16))) char)same);
        if (mask != 0xffff) {
            size_t at = i + (size_t)__builtin_ctz(~mask);
            return (int)l[at] - (int)r[at];
        }
    }
    for (; i < n; i++) {
        if (l[i] != r[i]) {
            return (int)l[i] - (int)r[i];
        }
    }
    return 0;
}

#ifdef REPLACE_LIBC
void *memcpy(void *restrict dst, const void *restrict src, size_t n)
    __attribute__((alias("func_sync_memmove")));
void *memmove(void *dst, const void *src, size_t n) __attribute__((alias("func_sync_memmove")));
int memcmp(const void *left, const void *right, size_t n) __attribute__((alias("func_sync_memcmp")));
int bcmp(const void *left, const void *right, size_t n) __attribute__((alias("func_sync_memcmp")));
#endif
