//! PostgreSQL's hash partitioning, bit for bit: the shard of a key among N shards is the
//! partition `PARTITION BY HASH (col)` with `MODULUS N` puts it in. The functions are
//! transcriptions of `src/common/hashfn.c` (Bob Jenkins' lookup3, little-endian path) and
//! of `compute_partition_hash_value` in `partbounds.c`.

/// `HASH_PARTITION_SEED` in PostgreSQL.
pub const HASH_PARTITION_SEED: u64 = 0x7A5B_2236_7996_DCFD;

#[inline]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

fn seeded(init: u32, seed: u64) -> (u32, u32, u32) {
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        a = a.wrapping_add((seed >> 32) as u32);
        b = b.wrapping_add(seed as u32);
        mix(&mut a, &mut b, &mut c);
    }
    (a, b, c)
}

/// `hash_bytes_extended` (a.k.a. `hash_any_extended`).
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    let init = 0x9e37_79b9u32
        .wrapping_add(k.len() as u32)
        .wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = seeded(init, seed);
    let word = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let mut k = k;
    while k.len() >= 12 {
        a = a.wrapping_add(word(&k[0..4]));
        b = b.wrapping_add(word(&k[4..8]));
        c = c.wrapping_add(word(&k[8..12]));
        mix(&mut a, &mut b, &mut c);
        k = &k[12..];
    }
    // The last 0..11 bytes; the lowest byte of c is reserved for the length.
    let byte = |i: usize| k[i] as u32;
    let len = k.len();
    if len >= 9 {
        for i in (8..len).rev() {
            c = c.wrapping_add(byte(i) << (8 * (i - 8 + 1)));
        }
    }
    if len >= 5 {
        for i in (4..len.min(8)).rev() {
            b = b.wrapping_add(byte(i) << (8 * (i - 4)));
        }
    }
    for i in (0..len.min(4)).rev() {
        a = a.wrapping_add(byte(i) << (8 * i));
    }
    final_mix(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// `hash_uint32_extended`.
pub fn hash_uint32_extended(k: u32, seed: u64) -> u64 {
    let init = 0x9e37_79b9u32.wrapping_add(4).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = seeded(init, seed);
    a = a.wrapping_add(k);
    final_mix(&mut a, &mut b, &mut c);
    ((b as u64) << 32) | c as u64
}

/// `hashint8extended`; int2 and int4 hash alike (PostgreSQL makes them compatible).
pub fn hash_int8_extended(v: i64, seed: u64) -> u64 {
    let lo = v as u32;
    let hi = (v >> 32) as u32;
    let lo = lo ^ if v >= 0 { hi } else { !hi };
    hash_uint32_extended(lo, seed)
}

/// `hash_combine64`.
/// The constant `hash_combine64` adds.
pub const HASH_COMBINE: u64 = 0x49a0_f4dd_15e5_a8e3;

#[inline]
pub fn hash_combine64(a: u64, b: u64) -> u64 {
    a ^ b
        .wrapping_add(HASH_COMBINE)
        .wrapping_add(a << 54)
        .wrapping_add(a >> 7)
}

/// A key value of a type hash partitioning supports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKey<'a> {
    /// int2, int4, int8.
    Int(i64),
    /// text, varchar, bpchar without trailing-space semantics (deterministic collation).
    Text(&'a [u8]),
    Uuid([u8; 16]),
}

/// The partition (shard) of a single-column key among `modulus` partitions.
pub fn partition_of(key: &HashKey<'_>, modulus: u64) -> u64 {
    let h = match key {
        HashKey::Int(v) => hash_int8_extended(*v, HASH_PARTITION_SEED),
        HashKey::Text(t) => hash_bytes_extended(t, HASH_PARTITION_SEED),
        HashKey::Uuid(u) => hash_bytes_extended(u, HASH_PARTITION_SEED),
    };
    hash_combine64(0, h) % modulus
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed by PostgreSQL 15 (signed, as SQL shows them), e.g.
    //   SELECT hashtextextended('hello', 8816678312871386365)
    #[test]
    fn matches_postgres_reference_values() {
        let s = HASH_PARTITION_SEED;
        let uuid = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        let cases: [(u64, i64); 8] = [
            (hash_int8_extended(1, 0), -3670598878359251130),
            (hash_int8_extended(-5, s), 5466844944386338076),
            (hash_uint32_extended(123456, s), 7518462043501142587),
            (hash_bytes_extended(b"hello", s), -2635279551741001039),
            (hash_bytes_extended(b"", s), -5700645584453517373),
            (
                hash_bytes_extended(b"a longer text, twenty-seven", s),
                -8552527741695082862,
            ),
            (hash_bytes_extended(b"123456789012", s), 7684977364204133850),
            (hash_bytes_extended(&uuid, s), 424513190990560493),
        ];
        for (i, (got, want)) in cases.iter().enumerate() {
            assert_eq!(*got as i64, *want, "case {i}");
        }
    }

    #[test]
    fn int_widths_hash_alike() {
        for v in [-70000i64, -1, 0, 1, 42, 70000] {
            assert_eq!(
                hash_int8_extended(v, 7),
                hash_uint32_extended(v as i32 as u32, 7)
            );
        }
    }
}
