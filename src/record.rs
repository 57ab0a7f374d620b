//! The one record codec of the two self-checking file formats, the journal
//! ([`crate::journal`]) and the delta ([`crate::delta`]): a record says how one block (or one raw
//! chunk) of one model file changes, and both formats store it the same way.
//!
//! # Record (all integers little-endian)
//!
//! ```text
//!   0   1  tag: 'R' journal record, 'X' delta record XOR'ed into the base, 'F' delta record
//!          holding the target bytes themselves
//!   1   4  file: index into the format's file table
//!   5   8  tensor offset: absolute offset of the block's tensor in the file (u64::MAX: raw
//!          file bytes, not a tensor's block)
//!   13  8  offset: absolute offset of the block in the file
//!   21  4  length L of the block
//!   25  16 old hash: the first 16 bytes of the block's chaining value before (zeros for 'F')
//!   41  16 new hash: the same after
//!   57  4  payload length P
//!   61  P  payload: 'R' and 'X': old XOR new, zero-run coded (below); 'F': the L new bytes
//! ```
//!
//! # Zero-run code
//!
//! A block's XOR is a sequence of items `varint(zeros) varint(n) n literal bytes`, meaning "skip
//! `zeros` unchanged bytes, then XOR these `n` bytes in"; bytes after the last item are
//! unchanged. Varints are LEB128. A literal run is broken by 3 or more zero bytes. A training
//! step changes few bytes per block, so a block's code is mostly its few changed bytes: smaller
//! and far faster than a general-purpose compressor for that data.

use crate::blockhash::Cv;
use crate::io::FileIo;

/// Bytes of a block hash kept in a record.
pub const HASH_PREFIX: usize = 16;
/// Length of a record's fixed head.
pub const HEAD_LEN: usize = 61;
/// Tag of a journal record.
pub const JOURNAL: u8 = b'R';
/// Tag of a delta record XOR'ed into the base bytes.
pub const XOR: u8 = b'X';
/// Tag of a delta record carrying the target bytes.
pub const WHOLE: u8 = b'F';
/// `tensor_offset` of records that carry raw file bytes rather than a tensor's block.
pub const RAW: u64 = u64::MAX;

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// [`JOURNAL`], [`XOR`] or [`WHOLE`].
    pub tag: u8,
    /// Index into the format's file table.
    pub file: u32,
    /// Absolute offset of the block's tensor, or [`RAW`].
    pub tensor_offset: u64,
    /// Absolute offset of the block.
    pub offset: u64,
    /// Length of the block.
    pub len: u32,
    /// Hash prefix before (zeros when unknown).
    pub old: [u8; HASH_PREFIX],
    /// Hash prefix after.
    pub new: [u8; HASH_PREFIX],
    /// Zero-run coded XOR of old and new, or the new bytes ([`WHOLE`]).
    pub payload: Vec<u8>,
}

/// The prefix of a chaining value kept in records.
pub fn hash_prefix(cv: &Cv) -> [u8; HASH_PREFIX] {
    cv[..HASH_PREFIX].try_into().expect("32 > 16")
}

/// A little-endian u32 at the start of `b` (callers check the length).
pub fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// A little-endian u64 at the start of `b` (callers check the length).
pub fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

impl Record {
    /// Whether the payload is a zero-run coded XOR (not the new bytes themselves).
    pub fn is_xor(&self) -> bool {
        self.tag != WHOLE
    }

    /// End of the block in its file, if it does not overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }

    /// Appends the record's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(HEAD_LEN + self.payload.len());
        out.push(self.tag);
        out.extend_from_slice(&self.file.to_le_bytes());
        out.extend_from_slice(&self.tensor_offset.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.old);
        out.extend_from_slice(&self.new);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// Decodes a record's head: the record without its payload, and the payload's length.
    pub fn decode_head(head: &[u8; HEAD_LEN]) -> (Record, u32) {
        (
            Record {
                tag: head[0],
                file: le_u32(&head[1..]),
                tensor_offset: le_u64(&head[5..]),
                offset: le_u64(&head[13..]),
                len: le_u32(&head[21..]),
                old: head[25..41].try_into().expect("16"),
                new: head[41..57].try_into().expect("16"),
                payload: Vec::new(),
            },
            le_u32(&head[57..]),
        )
    }

    /// The file index and encoded length of the record at the start of `bytes`, from its head.
    pub fn decode_head_len(bytes: &[u8]) -> Option<(u32, usize)> {
        let head: &[u8; HEAD_LEN] = bytes.get(..HEAD_LEN)?.try_into().ok()?;
        let (r, plen) = Record::decode_head(head);
        Some((r.file, HEAD_LEN + plen as usize))
    }

    /// Decodes one whole record from the start of `bytes`; returns it and its encoded length.
    pub fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
        let head: &[u8; HEAD_LEN] = bytes.get(..HEAD_LEN)?.try_into().ok()?;
        let (mut r, plen) = Record::decode_head(head);
        let end = HEAD_LEN.checked_add(usize::try_from(plen).ok()?)?;
        r.payload = bytes.get(HEAD_LEN..end)?.to_vec();
        Some((r, end))
    }
}

/// Why a run of records could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The file could not be read.
    Io(std::io::Error),
    /// A record is truncated or fails its format's check.
    Malformed(String),
}

/// Journal bytes read at once by [`read_batches`] (a record longer than this is read alone).
const READ_AHEAD: u64 = 4 << 20;

/// The bytes of a file read ahead: one read per [`READ_AHEAD`] bytes, not two per record.
struct Window {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    at: u64,
}

impl Window {
    /// Bytes `[pos, pos + n)` of `file`, which must lie before `end`.
    fn get(&mut self, file: &dyn FileIo, pos: u64, n: usize, end: u64) -> std::io::Result<&[u8]> {
        let have = pos >= self.at && pos + n as u64 <= self.at + self.buf.len() as u64;
        if !have {
            let len = (n as u64).max(READ_AHEAD).min(end - pos);
            self.buf.resize(len as usize, 0);
            file.read_at(pos, &mut self.buf)?;
            self.at = pos;
        }
        let from = (pos - self.at) as usize;
        Ok(&self.buf[from..from + n])
    }
}

/// Reads the records between bytes `start` and `end` of `file` and calls `f` with consecutive
/// batches holding about `batch_bytes` of payload and block bytes. Each record's head is given
/// to `check` (the format's rules: tag, file index, bounds) before its payload is read; a
/// refusal names the record's position. The file is read ahead in pieces of [`READ_AHEAD`]
/// bytes (a sparse sync's journal holds tens of thousands of small records).
pub fn read_batches<E>(
    file: &dyn FileIo,
    (start, end): (u64, u64),
    batch_bytes: usize,
    check: impl Fn(&Record, u32) -> Result<(), String>,
    error: impl Fn(ReadError) -> E,
    mut f: impl FnMut(Vec<Record>) -> Result<(), E>,
) -> Result<(), E> {
    let mut pos = start;
    let mut batch = Vec::new();
    let mut size = 0usize;
    let mut window = Window {
        buf: Vec::new(),
        at: start,
    };
    while pos < end {
        if end - pos < HEAD_LEN as u64 {
            return Err(error(ReadError::Malformed(format!(
                "record at byte {pos} is truncated"
            ))));
        }
        let head: &[u8; HEAD_LEN] = window
            .get(file, pos, HEAD_LEN, end)
            .map_err(|e| error(ReadError::Io(e)))?
            .try_into()
            .expect("HEAD_LEN bytes");
        let (mut r, plen) = Record::decode_head(head);
        let next = pos + HEAD_LEN as u64 + u64::from(plen);
        if next > end {
            return Err(error(ReadError::Malformed(format!(
                "record at byte {pos} is truncated"
            ))));
        }
        check(&r, plen).map_err(|what| {
            error(ReadError::Malformed(format!(
                "record at byte {pos}: {what}"
            )))
        })?;
        r.payload = window
            .get(file, pos + HEAD_LEN as u64, plen as usize, end)
            .map_err(|e| error(ReadError::Io(e)))?
            .to_vec();
        size += r.payload.len() + r.len as usize;
        batch.push(r);
        pos = next;
        if size >= batch_bytes {
            f(std::mem::take(&mut batch))?;
            size = 0;
        }
    }
    if !batch.is_empty() {
        f(batch)?;
    }
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *input.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The first index from `i` on where `old` and `new` differ (`n` if none), comparing 32 bytes
/// at a time: a training step leaves most of a block's bytes equal.
fn skip_equal(old: &[u8], new: &[u8], mut i: usize) -> usize {
    let n = old.len();
    let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    while i + 32 <= n {
        let x = (word(old, i) ^ word(new, i))
            | (word(old, i + 8) ^ word(new, i + 8))
            | (word(old, i + 16) ^ word(new, i + 16))
            | (word(old, i + 24) ^ word(new, i + 24));
        if x != 0 {
            break;
        }
        i += 32;
    }
    // The first differing byte: the lowest non-zero byte of the first non-zero XOR word.
    while i + 8 <= n {
        let x = word(old, i) ^ word(new, i);
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && old[i] == new[i] {
        i += 1;
    }
    i
}

/// Appends the zero-run code of `old XOR new` to `out`; returns how many bytes differ.
pub fn encode_xor(old: &[u8], new: &[u8], out: &mut Vec<u8>) -> u64 {
    debug_assert_eq!(old.len(), new.len());
    let n = old.len();
    let mut differing = 0u64;
    let mut pos = 0; // first byte not yet coded
    let mut i = 0;
    while i < n {
        i = skip_equal(old, new, i);
        if i >= n {
            break;
        }
        let start = i;
        // Extend the literal until 3 equal bytes in a row (or the end).
        let mut end = i;
        let mut equal_run = 0;
        while i < n && equal_run < 3 {
            if old[i] == new[i] {
                equal_run += 1;
            } else {
                equal_run = 0;
                end = i + 1;
                differing += 1;
            }
            i += 1;
        }
        put_varint(out, (start - pos) as u64);
        put_varint(out, (end - start) as u64);
        out.extend(
            old[start..end]
                .iter()
                .zip(&new[start..end])
                .map(|(a, b)| a ^ b),
        );
        pos = end;
        i = end;
    }
    differing
}

/// XORs a zero-run coded payload into `target`; `None` if the payload is malformed or runs past
/// the end of `target`.
pub fn apply_xor(payload: &[u8], target: &mut [u8]) -> Option<()> {
    let mut p = 0;
    let mut pos = 0usize;
    while p < payload.len() {
        let zeros = usize::try_from(get_varint(payload, &mut p)?).ok()?;
        let n = usize::try_from(get_varint(payload, &mut p)?).ok()?;
        pos = pos.checked_add(zeros)?;
        let lit = payload.get(p..p.checked_add(n)?)?;
        let dst = target.get_mut(pos..pos.checked_add(n)?)?;
        for (d, x) in dst.iter_mut().zip(lit) {
            *d ^= x;
        }
        p += n;
        pos += n;
    }
    Some(())
}

/// The code of the XOR of two codes of a block of `len` bytes: one change after the other
/// (a block changed by several generations ships, or is undone, once). `None` if either is
/// malformed.
pub fn compose_xor(first: &[u8], then: &[u8], len: usize) -> Option<Vec<u8>> {
    let mut delta = vec![0u8; len];
    apply_xor(first, &mut delta)?;
    apply_xor(then, &mut delta)?;
    let mut out = Vec::new();
    encode_xor(&vec![0u8; len], &delta, &mut out);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An in-memory file that counts its reads.
    struct Counted(Vec<u8>, std::sync::atomic::AtomicUsize);

    impl FileIo for Counted {
        fn path(&self) -> &std::path::Path {
            std::path::Path::new("<memory>")
        }
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn stat(&self) -> std::io::Result<crate::io::FileStat> {
            Err(std::io::Error::other("in memory"))
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let at = offset as usize;
            buf.copy_from_slice(self.0.get(at..at + buf.len()).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end")
            })?);
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("read only"))
        }
        fn sync(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Tens of thousands of small records (a sparse sync's journal) and one larger than the
    /// read-ahead come back exactly, in order and in batches, with one read per read-ahead
    /// window instead of two per record; a record cut by the range's end is refused.
    #[test]
    fn records_are_read_back_in_few_reads() {
        let mut bytes = vec![7u8; 5];
        let mut written = Vec::new();
        for i in 0..30_000u32 {
            let payload = if i == 20_000 {
                vec![3u8; (READ_AHEAD + 100) as usize]
            } else {
                vec![(i % 251) as u8; (i % 40) as usize]
            };
            let r = Record {
                tag: JOURNAL,
                file: i % 3,
                tensor_offset: 0,
                offset: u64::from(i) * 4096,
                len: 4096,
                old: [1; HASH_PREFIX],
                new: [2; HASH_PREFIX],
                payload,
            };
            r.encode(&mut bytes);
            written.push(r);
        }
        let end = bytes.len() as u64;
        let file = Counted(bytes, std::sync::atomic::AtomicUsize::new(0));
        let mut read = Vec::new();
        let mut batches = 0;
        read_batches(
            &file,
            (5, end),
            1 << 20,
            |_, _| Ok(()),
            |e| format!("{e:?}"),
            |b| {
                batches += 1;
                read.extend(b);
                Ok(())
            },
        )
        .unwrap();
        assert!(read == written, "records differ");
        assert!(batches > 100);
        let reads = file.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            reads <= (end / READ_AHEAD) as usize + 4,
            "{reads} reads for {end} bytes"
        );
        let cut = read_batches(
            &file,
            (5, end - 1),
            1 << 20,
            |_, _| Ok(()),
            |e| format!("{e:?}"),
            |_| Ok(()),
        );
        assert!(cut.unwrap_err().contains("truncated"));
    }

    fn xor_round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut code = Vec::new();
        let differing = encode_xor(old, new, &mut code);
        assert_eq!(
            differing as usize,
            old.iter().zip(new).filter(|(a, b)| a != b).count()
        );
        let mut t = old.to_vec();
        apply_xor(&code, &mut t).unwrap();
        assert_eq!(t, new);
        // XOR is its own inverse: the same code turns new back into old.
        apply_xor(&code, &mut t).unwrap();
        assert_eq!(t, old);
        code.len()
    }

    #[test]
    fn xor_code_round_trips_and_is_small_for_sparse_changes() {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
        assert_eq!(xor_round_trip(&old, &old), 0);
        let mut one = old.clone();
        one[4095] ^= 0x40;
        assert!(xor_round_trip(&old, &one) <= 4);
        let mut spread = old.clone();
        for i in (7..4096).step_by(200) {
            spread[i] ^= 1;
            spread[i + 1] ^= 0x80;
        }
        let n = xor_round_trip(&old, &spread);
        assert!(n <= 21 * 5, "{n}");
        let other: Vec<u8> = old.iter().map(|b| !b).collect();
        assert!(xor_round_trip(&old, &other) <= 4096 + 4);
        for len in [0, 1, 2, 3, 7, 8, 9, 513] {
            let a = vec![1u8; len];
            let mut b = a.clone();
            if len > 0 {
                b[len - 1] = 0;
                b[0] = 0;
            }
            xor_round_trip(&a, &b);
        }
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        let mut t = [0u8; 16];
        assert!(
            apply_xor(&[0, 5, 1, 2], &mut t).is_none(),
            "literal past the payload"
        );
        assert!(
            apply_xor(&[15, 2, 1, 1], &mut t).is_none(),
            "literal past the block"
        );
        assert!(apply_xor(&[0xff; 11], &mut t).is_none(), "varint overflow");
    }

    fn any_record() -> impl Strategy<Value = Record> {
        (
            prop::sample::select(vec![JOURNAL, XOR, WHOLE]),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(
                |(tag, file, tensor_offset, offset, len, old, new, payload)| Record {
                    tag,
                    file,
                    tensor_offset,
                    offset,
                    len,
                    old,
                    new,
                    payload,
                },
            )
    }

    proptest! {
        #[test]
        fn records_round_trip(r in any_record(), tail in prop::collection::vec(any::<u8>(), 0..20)) {
            let mut bytes = Vec::new();
            r.encode(&mut bytes);
            let n = bytes.len();
            bytes.extend(&tail);
            prop_assert_eq!(Record::decode(&bytes), Some((r, n)));
            // Any truncation is refused, never misread.
            prop_assert_eq!(Record::decode(&bytes[..n - 1]), None);
        }

        #[test]
        fn random_bytes_never_panic_the_record_or_xor_decoders(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            len in 0usize..5000,
        ) {
            let _ = Record::decode(&bytes);
            let mut target = vec![0u8; len];
            let _ = apply_xor(&bytes, &mut target);
            let _ = compose_xor(&bytes, &bytes, len);
        }

        #[test]
        fn skip_equal_finds_the_first_differing_byte_from_anywhere(
            old in prop::collection::vec(any::<u8>(), 0..300),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
        ) {
            // Few differing bytes, so equal runs of every length end at every offset of a word.
            let mut new = old.clone();
            if !old.is_empty() {
                for (at, x) in &flips {
                    new[at.index(old.len())] ^= x;
                }
            }
            for from in 0..=old.len() {
                let first = (from..old.len()).find(|&k| old[k] != new[k]).unwrap_or(old.len());
                prop_assert_eq!(skip_equal(&old, &new, from), first, "from {}", from);
            }
        }

        #[test]
        fn xor_codes_compose(a in prop::collection::vec(any::<u8>(), 1..600), seed in any::<u64>()) {
            let mut rng = crate::synthetic::Rng::new(seed);
            let mut b = a.clone();
            let mut c = a.clone();
            for i in 0..a.len() {
                if rng.next_u64() % 7 == 0 { b[i] ^= rng.next_u64() as u8; }
                if rng.next_u64() % 5 == 0 { c[i] = b[i] ^ (rng.next_u64() as u8); } else { c[i] = b[i]; }
            }
            let (mut ab, mut bc) = (Vec::new(), Vec::new());
            encode_xor(&a, &b, &mut ab);
            encode_xor(&b, &c, &mut bc);
            let ac = compose_xor(&ab, &bc, a.len()).unwrap();
            let mut t = a.clone();
            apply_xor(&ac, &mut t).unwrap();
            prop_assert_eq!(t, c);
        }
    }
}
