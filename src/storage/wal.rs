//! WAL segments: the byte format, the recovery scan, and the writer core.
//!
//! A segment is `wal-<first LSN, 20 digits>.log`:
//!
//! ```text
//! header (24 bytes): magic "QUOTAWAL" | version u16 | flags u16 | first_lsn u64 | crc32 u32 (of the 20 bytes before)
//! record:            len u32 | crc32 u32 | lsn u64 | payload (len & 0xFF_FFFF bytes)
//! ```
//! All integers little-endian. A record's `len` holds the payload length in its
//! low 24 bits and, in its high byte, the XOR of those three bytes with 0xA5, so
//! any single flipped bit of a length is detected before it can be mistaken for
//! a torn tail or make the reader allocate. The record CRC covers `lsn` and the
//! payload (everything after it). LSNs are consecutive across segments.
//!
//! `flags` is 0 on a single node. [`FLAG_RAFT`] marks the segments of a
//! cluster node, whose records are Raft entries (the LSN is the Raft index
//! plus one); each kind of node refuses the other's log.
//!
//! Recovery: the last segment may end in a torn tail (an incomplete record, or
//! zero bytes where an unsynced write never landed); it is truncated and the
//! byte count reported. Zeros alone are not reported: they are also the space
//! the daemon writes ahead of the end (see `io`), and hold nothing lost. A
//! batch written over those zeros and cut short by a crash leaves a last
//! record whose sectors from some boundary on are zeros, with the file going
//! on past it: that too is a torn tail ([`torn_over_zeros`]). Any other
//! damage, anywhere, is corruption: the daemon refuses to start and names the
//! file and offset.

use std::sync::Arc;

use super::io::{WalDir, WalFile};
use crate::engine::Lsn;

/// Segment file magic.
pub const MAGIC: [u8; 8] = *b"QUOTAWAL";
/// Segment header length.
pub const HEADER_BYTES: usize = 24;
/// Header flag of a cluster node's segments: records are Raft entries.
pub const FLAG_RAFT: u16 = 1;
/// Record header length: len, crc, lsn.
pub const RECORD_HEADER_BYTES: usize = 16;
/// Largest record payload: one operation's mutations are far smaller.
pub const MAX_PAYLOAD_BYTES: usize = 4 << 20;

/// Receives each record during a scan: (LSN, format version, payload). An error
/// (the payload does not decode) makes the scan report corruption at that record.
pub type RecordSink<'a> = dyn FnMut(Lsn, u16, &[u8]) -> Result<(), String> + 'a;

/// A damaged log: where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WAL corrupt: {file} at byte {offset}: {message}")]
pub struct Corruption {
    /// Segment file name.
    pub file: String,
    /// Byte offset in it.
    pub offset: u64,
    /// What is wrong.
    pub message: String,
}

/// WAL failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// The log is damaged beyond a torn tail.
    #[error("{0}")]
    Corrupt(#[from] Corruption),
    /// The filesystem failed.
    #[error("WAL I/O error on {file}: {source}")]
    Io {
        /// What was being accessed.
        file: String,
        /// The error.
        source: std::io::Error,
    },
    /// An earlier write or sync failed; the log takes nothing more.
    #[error("an earlier WAL write or sync failed; no further writes are taken")]
    PreviousIo,
    /// A write or sync failed, and so did cutting the failed batch off the
    /// log: some of it may be replayed at the next start.
    #[error("{write}; cutting the failed records off the log failed too ({undo}): their outcome is unknown")]
    Unrecoverable {
        /// The failed write or sync.
        write: Box<WalError>,
        /// The failed truncation or removal.
        undo: Box<WalError>,
    },
}

fn io_err(file: &str) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        file: file.to_string(),
        source,
    }
}

/// Name of the segment starting at `first_lsn`.
pub fn segment_name(first_lsn: Lsn) -> String {
    format!("wal-{first_lsn:020}.log")
}

fn parse_segment_name(name: &str) -> Option<Lsn> {
    name.strip_prefix("wal-")?.strip_suffix(".log")?.parse().ok()
}

/// The 24 header bytes of a single node's segment.
pub fn encode_header(version: u16, first_lsn: Lsn) -> [u8; HEADER_BYTES] {
    encode_header_flags(version, 0, first_lsn)
}

/// The 24 header bytes of a segment with `flags`.
pub fn encode_header_flags(version: u16, flags: u16, first_lsn: Lsn) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    h[10..12].copy_from_slice(&flags.to_le_bytes());
    h[12..20].copy_from_slice(&first_lsn.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

fn len_check(len: u32) -> u32 {
    let b = len.to_le_bytes();
    u32::from(b[0] ^ b[1] ^ b[2] ^ 0xA5)
}

/// Appends one framed record to `out`.
pub fn frame(lsn: Lsn, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        !payload.is_empty() && payload.len() <= MAX_PAYLOAD_BYTES,
        "record payload of {} bytes",
        payload.len()
    );
    let len = payload.len() as u32;
    out.extend_from_slice(&(len | (len_check(len) << 24)).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&lsn.to_le_bytes());
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(payload);
}

/// What a scan of the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Segment files read.
    pub segments: usize,
    /// Records read (all, not only those replayed).
    pub records: u64,
    /// LSN of the first record, if any.
    pub first_lsn: Option<Lsn>,
    /// LSN of the last record, if any.
    pub last_lsn: Option<Lsn>,
    /// Bytes of the torn tail (0 if none).
    pub torn_tail_bytes: u64,
    /// The segment with the torn tail.
    pub torn_tail_file: Option<String>,
}

/// One segment parsed: its header and the records it holds.
struct Parsed {
    version: u16,
    first_lsn: Lsn,
    /// (lsn, payload range) in order.
    records: Vec<(Lsn, std::ops::Range<usize>)>,
    /// Length of the valid prefix (header plus whole records).
    valid_len: usize,
}

/// Parses a segment. `last` says whether a torn tail is allowed; `Ok(None)` is a
/// last segment torn inside its header (it holds nothing).
fn parse_segment(name: &str, bytes: &[u8], last: bool, flags: u16) -> Result<Option<Parsed>, Corruption> {
    let corrupt = |offset: usize, message: String| Corruption {
        file: name.to_string(),
        offset: offset as u64,
        message,
    };
    if bytes.len() < HEADER_BYTES {
        if last {
            return Ok(None);
        }
        return Err(corrupt(
            0,
            format!("segment is {} bytes, shorter than its header", bytes.len()),
        ));
    }
    if bytes[..8] != MAGIC {
        return Err(corrupt(0, "bad magic: not a quotad WAL segment".into()));
    }
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..20]) != crc {
        return Err(corrupt(0, "segment header checksum mismatch".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    let found = u16::from_le_bytes([bytes[10], bytes[11]]);
    if found != flags {
        return Err(corrupt(
            10,
            if found & FLAG_RAFT != 0 {
                "this segment belongs to a cluster node (it holds Raft entries): start quotad with the \
                 [cluster] section this data directory was made with"
                    .into()
            } else if flags & FLAG_RAFT != 0 {
                "this segment belongs to a single node, not a cluster: a cluster node starts on an empty \
                 data directory"
                    .into()
            } else {
                format!("unknown segment flags {found:#06x}")
            },
        ));
    }
    let first_lsn = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if parse_segment_name(name) != Some(first_lsn) {
        return Err(corrupt(
            12,
            format!("header says first LSN {first_lsn}, the file name says otherwise"),
        ));
    }
    let mut records = Vec::new();
    let mut off = HEADER_BYTES;
    let mut expect = first_lsn;
    while off < bytes.len() {
        let rest = &bytes[off..];
        if last && rest.iter().all(|&b| b == 0) {
            break; // zeros where an unsynced write never landed
        }
        if rest.len() < RECORD_HEADER_BYTES {
            if last {
                break;
            }
            return Err(corrupt(
                off,
                format!("{} bytes left, less than a record header", rest.len()),
            ));
        }
        let field = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        let len = field & 0x00FF_FFFF;
        if field >> 24 != len_check(len) {
            // A header cut at a sector boundary inside it, over zeros ahead.
            if last && torn_over_zeros(bytes, off, off + RECORD_HEADER_BYTES) {
                break;
            }
            return Err(corrupt(
                off,
                format!("record length field {field:#010x} fails its check byte"),
            ));
        }
        let len = len as usize;
        if len == 0 || len > MAX_PAYLOAD_BYTES {
            return Err(corrupt(
                off,
                format!("record length {len} is outside 1..={MAX_PAYLOAD_BYTES}"),
            ));
        }
        if rest.len() < RECORD_HEADER_BYTES + len {
            if last {
                break;
            }
            return Err(corrupt(
                off,
                format!("record of {len} bytes runs past the end of the segment"),
            ));
        }
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if crc32fast::hash(&rest[8..RECORD_HEADER_BYTES + len]) != crc {
            if last && torn_over_zeros(bytes, off, off + RECORD_HEADER_BYTES + len) {
                break;
            }
            return Err(corrupt(off, "record checksum mismatch".into()));
        }
        let lsn = u64::from_le_bytes(rest[8..16].try_into().expect("8 bytes"));
        if lsn != expect {
            return Err(corrupt(off + 8, format!("record LSN {lsn}, expected {expect}")));
        }
        records.push((lsn, off + RECORD_HEADER_BYTES..off + RECORD_HEADER_BYTES + len));
        expect += 1;
        off += RECORD_HEADER_BYTES + len;
    }
    let valid_len = records.last().map_or(HEADER_BYTES, |(_, r)| r.end);
    Ok(Some(Parsed {
        version,
        first_lsn,
        records,
        valid_len,
    }))
}

/// The unit a disk writes whole or not at all.
const SECTOR: usize = 512;

/// Whether the record at `start..end` of the last segment, whose checksum
/// fails, is a batch cut short while it was written over zeros written ahead
/// (see `io`): from a sector boundary inside the record every byte to the
/// end of the file is zero (those sectors never landed), and the file goes
/// on past the record, which only zeros written ahead make it do. A record
/// that ends the file, or whose damage is followed by data, is corruption as
/// before.
fn torn_over_zeros(bytes: &[u8], start: usize, end: usize) -> bool {
    if end >= bytes.len() {
        return false;
    }
    let zeros_from = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    // The first boundary after the record's start (its length field landed).
    let boundary = zeros_from.max(start + 1).div_ceil(SECTOR) * SECTOR;
    boundary < end
}

/// A segment file opened again: the file, its bytes, and what they hold.
type OpenSegment = (Box<dyn WalFile>, Vec<u8>, Parsed);

/// A segment of the open log.
#[derive(Debug, Clone)]
struct Segment {
    name: String,
    first_lsn: Lsn,
}

/// The log, open for appending.
pub struct Wal {
    /// Where the segments are.
    dir: Arc<dyn WalDir>,
    /// Segments in LSN order; the last is the active one.
    segments: Vec<Segment>,
    /// The active segment, once one exists.
    active: Option<Box<dyn WalFile>>,
    /// Bytes in the active segment.
    active_bytes: u64,
    /// LSN the next record must have.
    next_lsn: Lsn,
    /// Rotate to a new segment beyond this size.
    segment_bytes_max: u64,
    /// Format version written in new segments.
    version: u16,
    /// Format version of the active segment: a new segment is started before
    /// records of another version are written.
    active_version: u16,
    /// Set after a failed write or sync: nothing more is written (no retry).
    failed: bool,
    /// Header flags of every segment ([`FLAG_RAFT`] or 0).
    flags: u16,
}

fn scan(
    dir: &dyn WalDir,
    after_lsn: Lsn,
    truncate: bool,
    flags: u16,
    on_record: &mut RecordSink<'_>,
) -> Result<(ScanReport, Vec<Segment>, Lsn), WalError> {
    let mut names: Vec<(Lsn, String)> = dir
        .list()
        .map_err(io_err("."))?
        .into_iter()
        .filter_map(|n| Some((parse_segment_name(&n)?, n)))
        .collect();
    names.sort();
    let mut report = ScanReport::default();
    let mut segments = Vec::new();
    let mut next: Option<Lsn> = None;
    let count = names.len();
    for (i, (_, name)) in names.iter().enumerate() {
        let last = i + 1 == count;
        let mut file = dir.open(name).map_err(io_err(name))?;
        let bytes = file.read_all().map_err(io_err(name))?;
        let Some(p) = parse_segment(name, &bytes, last, flags)? else {
            // Torn while its header was written: it never held a record.
            report.torn_tail_bytes = bytes.len() as u64;
            report.torn_tail_file = Some(name.clone());
            if truncate {
                dir.remove(name).map_err(io_err(name))?;
            }
            continue;
        };
        report.segments += 1;
        match next {
            // A Raft log may start after its purged point (Raft decides
            // what it needs, and sends a snapshot for what is gone).
            None if p.first_lsn > after_lsn + 1 && flags & FLAG_RAFT == 0 => {
                return Err(Corruption {
                    file: name.clone(),
                    offset: 0,
                    message: format!(
                        "the log starts at LSN {} but the snapshot ends at {after_lsn}: records are missing",
                        p.first_lsn
                    ),
                }
                .into())
            }
            Some(n) if p.first_lsn != n => {
                return Err(Corruption {
                    file: name.clone(),
                    offset: 0,
                    message: format!(
                        "segment starts at LSN {}, expected {n}: a segment is missing",
                        p.first_lsn
                    ),
                }
                .into())
            }
            _ => {}
        }
        for (lsn, range) in &p.records {
            report.first_lsn.get_or_insert(*lsn);
            report.last_lsn = Some(*lsn);
            report.records += 1;
            if *lsn > after_lsn {
                on_record(*lsn, p.version, &bytes[range.clone()]).map_err(|message| Corruption {
                    file: name.clone(),
                    offset: (range.start - RECORD_HEADER_BYTES) as u64,
                    message: format!("record {lsn} does not decode: {message}"),
                })?;
            }
        }
        next = Some(p.first_lsn + p.records.len() as u64);
        if p.valid_len < bytes.len() {
            // Zeros alone past the last record are space written ahead (or
            // a write that never landed): nothing of a record was lost.
            if bytes[p.valid_len..].iter().any(|&b| b != 0) {
                report.torn_tail_bytes = (bytes.len() - p.valid_len) as u64;
                report.torn_tail_file = Some(name.clone());
            }
            if truncate {
                file.truncate(p.valid_len as u64).map_err(io_err(name))?;
            }
        }
        segments.push(Segment {
            name: name.clone(),
            first_lsn: p.first_lsn,
        });
    }
    match next {
        // A Raft log may end before its purged point: purged past its end
        // by an installed snapshot, it starts again after it.
        Some(n) if n < after_lsn + 1 && flags & FLAG_RAFT == 0 => Err(Corruption {
            file: segments.last().map(|s| s.name.clone()).unwrap_or_default(),
            offset: 0,
            message: format!("the log ends before LSN {n} but the snapshot is at LSN {after_lsn}: records are missing"),
        }
        .into()),
        _ => Ok((report, segments, next.unwrap_or(after_lsn + 1))),
    }
}

/// Reads the whole log without changing it: for `quotad wal verify` and `dump`.
/// `on_record` sees every record after `after_lsn`.
pub fn verify(dir: &dyn WalDir, after_lsn: Lsn, on_record: &mut RecordSink<'_>) -> Result<ScanReport, WalError> {
    scan(dir, after_lsn, false, 0, on_record).map(|(r, _, _)| r)
}

impl Wal {
    /// Recovers the log: checks every segment, truncates a torn tail, hands each
    /// record after `after_lsn` to `on_record`, and opens the log for appending.
    pub fn open(
        dir: Arc<dyn WalDir>,
        after_lsn: Lsn,
        segment_bytes_max: u64,
        version: u16,
        on_record: &mut RecordSink<'_>,
    ) -> Result<(Wal, ScanReport), WalError> {
        Self::open_flagged(dir, after_lsn, segment_bytes_max, version, 0, on_record)
    }

    /// As [`Wal::open`], for segments with header `flags` (a cluster node's
    /// log: [`FLAG_RAFT`]).
    pub fn open_flagged(
        dir: Arc<dyn WalDir>,
        after_lsn: Lsn,
        segment_bytes_max: u64,
        version: u16,
        flags: u16,
        on_record: &mut RecordSink<'_>,
    ) -> Result<(Wal, ScanReport), WalError> {
        let (report, segments, next_lsn) = scan(dir.as_ref(), after_lsn, true, flags, on_record)?;
        let (active, active_bytes, active_version) = match segments.last() {
            Some(s) => {
                let mut f = dir.open(&s.name).map_err(io_err(&s.name))?;
                let bytes = f.read_all().map_err(io_err(&s.name))?;
                let v = u16::from_le_bytes([bytes[8], bytes[9]]);
                (Some(f), bytes.len() as u64, v)
            }
            None => (None, 0, version),
        };
        let wal = Wal {
            dir,
            segments,
            active,
            active_bytes,
            next_lsn,
            segment_bytes_max,
            version,
            active_version,
            failed: false,
            flags,
        };
        Ok((wal, report))
    }

    /// LSN of the next record.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// Writes framed records `first_lsn..=last_lsn` with one write and one
    /// fdatasync, rotating to a new segment first if the active one is full. On
    /// any error the log is failed for good: nothing is retried.
    ///
    /// A failed write or sync may still have put some of the batch on disk (a
    /// short write on a full disk, or pages the kernel flushes later), where
    /// the next start would replay it. So before the error is returned, the
    /// batch is cut off again, durably: the active segment is truncated back
    /// to its length before the batch (and synced), a segment created for it
    /// is deleted (and the directory synced). Then [`WalError::Io`] means
    /// nothing of the batch can ever be replayed, and its requests may be
    /// told so; [`WalError::Unrecoverable`] means the cut failed too, and
    /// the outcome of the batch is unknown.
    pub fn write(&mut self, framed: &[u8], first_lsn: Lsn, last_lsn: Lsn) -> Result<(), WalError> {
        if self.failed {
            return Err(WalError::PreviousIo);
        }
        assert_eq!(first_lsn, self.next_lsn, "records reach the WAL in LSN order");
        assert!(last_lsn >= first_lsn && !framed.is_empty());
        let rotate = self.active.is_none()
            || self.active_version != self.version
            || (self.active_bytes > HEADER_BYTES as u64
                && self.active_bytes + framed.len() as u64 > self.segment_bytes_max);
        let result = if rotate {
            self.write_new_segment(framed, first_lsn)
        } else {
            self.append_active(framed)
        };
        match result {
            Ok(()) => {
                self.next_lsn = last_lsn + 1;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                let undo = if rotate {
                    self.remove_unlisted(&segment_name(first_lsn))
                } else {
                    self.truncate_active(self.active_bytes)
                };
                match undo {
                    Ok(()) => Err(e),
                    Err(undo) => Err(WalError::Unrecoverable {
                        write: Box::new(e),
                        undo: Box::new(undo),
                    }),
                }
            }
        }
    }

    /// Starts segment `first_lsn` with the batch: the header goes out with
    /// it, one write and one sync.
    fn write_new_segment(&mut self, framed: &[u8], first_lsn: Lsn) -> Result<(), WalError> {
        if let (Some(file), Some(s)) = (self.active.as_mut(), self.segments.last()) {
            // Only the last segment may end in zeros written ahead.
            file.seal().map_err(io_err(&s.name))?;
        }
        let name = segment_name(first_lsn);
        let mut file = self.dir.create(&name).map_err(io_err(&name))?;
        let mut buf = Vec::with_capacity(HEADER_BYTES + framed.len());
        buf.extend_from_slice(&encode_header_flags(self.version, self.flags, first_lsn));
        buf.extend_from_slice(framed);
        file.append(&buf).map_err(io_err(&name))?;
        file.sync_data().map_err(io_err(&name))?;
        self.segments.push(Segment { name, first_lsn });
        self.active = Some(file);
        self.active_version = self.version;
        self.active_bytes = buf.len() as u64;
        Ok(())
    }

    fn append_active(&mut self, framed: &[u8]) -> Result<(), WalError> {
        let name = &self.segments.last().expect("an active segment exists").name;
        let file = self.active.as_mut().expect("an active segment exists");
        file.append(framed).map_err(io_err(name))?;
        file.sync_data().map_err(io_err(name))?;
        self.active_bytes += framed.len() as u64;
        Ok(())
    }

    /// Deletes a segment created for a failed batch (not yet in `segments`).
    fn remove_unlisted(&self, name: &str) -> Result<(), WalError> {
        match self.dir.remove(name) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(name)(e)),
            _ => Ok(()),
        }
    }

    /// Cuts the active segment back to `len` bytes (durably, as
    /// [`WalFile::truncate`] does).
    fn truncate_active(&mut self, len: u64) -> Result<(), WalError> {
        let name = &self.segments.last().expect("an active segment exists").name;
        let file = self.active.as_mut().expect("an active segment exists");
        file.truncate(len).map_err(io_err(name))
    }

    /// Deletes segments whose records all have LSN ≤ `lsn` (never the active
    /// one). Returns how many were deleted.
    pub fn remove_through(&mut self, lsn: Lsn) -> Result<usize, WalError> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first_lsn <= lsn + 1 {
            let s = self.segments.remove(0);
            self.dir.remove(&s.name).map_err(io_err(&s.name))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Cuts every record with LSN ≥ `lsn` off the log, durably: later
    /// segments are deleted (newest first) and the one holding `lsn` is
    /// truncated before it. A Raft follower does this when a new leader
    /// overwrites entries that were never committed. An error fails the log,
    /// as a failed write does.
    pub fn truncate_from(&mut self, lsn: Lsn) -> Result<(), WalError> {
        if self.failed {
            return Err(WalError::PreviousIo);
        }
        if lsn >= self.next_lsn {
            return Ok(());
        }
        let r = self.cut_from(lsn);
        self.failed = r.is_err();
        r
    }

    fn cut_from(&mut self, lsn: Lsn) -> Result<(), WalError> {
        self.active = None;
        self.active_bytes = 0;
        while self.segments.last().is_some_and(|s| s.first_lsn >= lsn) {
            let s = self.segments.pop().expect("a last segment");
            self.dir.remove(&s.name).map_err(io_err(&s.name))?;
        }
        self.next_lsn = lsn;
        let Some(last) = self.segments.last() else {
            return Ok(());
        };
        let (mut file, _, parsed) = self.read_segment(last)?;
        let len = parsed
            .records
            .get((lsn - parsed.first_lsn) as usize)
            .map_or(parsed.valid_len, |(_, r)| r.start - RECORD_HEADER_BYTES);
        file.truncate(len as u64).map_err(io_err(&last.name))?;
        self.active_version = parsed.version;
        self.active_bytes = len as u64;
        self.active = Some(file);
        Ok(())
    }

    /// Deletes every segment and starts the log again at `lsn + 1`: a Raft
    /// node whose whole log is older than an installed snapshot. An error
    /// fails the log.
    pub fn reset_after(&mut self, lsn: Lsn) -> Result<(), WalError> {
        if self.failed {
            return Err(WalError::PreviousIo);
        }
        let r = self.cut_from(self.segments.first().map_or(self.next_lsn, |s| s.first_lsn));
        self.failed = r.is_err();
        self.next_lsn = lsn + 1;
        r
    }

    /// Opens and parses a segment of the open log (a torn tail allowed):
    /// the open file, its bytes, and what they hold.
    fn read_segment(&self, s: &Segment) -> Result<OpenSegment, WalError> {
        let mut file = self.dir.open(&s.name).map_err(io_err(&s.name))?;
        let bytes = file.read_all().map_err(io_err(&s.name))?;
        let parsed = parse_segment(&s.name, &bytes, true, self.flags)?.ok_or_else(|| Corruption {
            file: s.name.clone(),
            offset: 0,
            message: "segment has no header".into(),
        })?;
        Ok((file, bytes, parsed))
    }

    /// Reads the records `from..to` back from disk (a Raft node's entries
    /// older than it keeps in memory): (LSN, format version, payload).
    pub fn read_range(&self, from: Lsn, to: Lsn) -> Result<Vec<(Lsn, u16, Vec<u8>)>, WalError> {
        let start = self.segments.iter().rposition(|s| s.first_lsn <= from).unwrap_or(0);
        let mut out = Vec::new();
        for s in self.segments[start..].iter().take_while(|s| s.first_lsn < to) {
            let (_, bytes, p) = self.read_segment(s)?;
            for (lsn, range) in p.records.into_iter().filter(|(l, _)| (from..to).contains(l)) {
                out.push((lsn, p.version, bytes[range].to_vec()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::SimDir;

    fn write_log(records: &[&[u8]]) -> SimDir {
        let dir = SimDir::new();
        let (mut wal, _) = Wal::open(Arc::new(dir.clone()), 0, 1 << 20, 1, &mut |_, _, _| Ok(())).unwrap();
        for (i, r) in records.iter().enumerate() {
            let mut buf = Vec::new();
            frame(i as u64 + 1, r, &mut buf);
            wal.write(&buf, i as u64 + 1, i as u64 + 1).unwrap();
        }
        dir
    }

    type Read = (Vec<(Lsn, Vec<u8>)>, ScanReport);

    fn read(dir: &SimDir) -> Result<Read, WalError> {
        let mut got = Vec::new();
        let (_, report) = Wal::open(Arc::new(dir.clone()), 0, 1 << 20, 1, &mut |lsn, _, p| {
            got.push((lsn, p.to_vec()));
            Ok(())
        })?;
        Ok((got, report))
    }

    fn raft_log(segment_max: u64, n: u64) -> (SimDir, Wal) {
        let dir = SimDir::new();
        let (mut wal, _) = Wal::open_flagged(Arc::new(dir.clone()), 0, segment_max, 1, FLAG_RAFT, &mut |_, _, _| {
            Ok(())
        })
        .unwrap();
        for lsn in 1..=n {
            let mut buf = Vec::new();
            frame(lsn, format!("r{lsn}").as_bytes(), &mut buf);
            wal.write(&buf, lsn, lsn).unwrap();
        }
        (dir, wal)
    }

    /// On the real filesystem with zeros written ahead: every segment but
    /// the last ends at its last record, the last one in zeros that are not
    /// reported as torn; a restart appends right after the last record.
    #[test]
    fn zeros_written_ahead_are_space_not_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, dir) = ahead_dir(tmp.path());
        let (mut wal, _) = open_ahead(&dir, &mut vec![]).unwrap();
        write_ahead_log(&mut wal, 1, 10);
        // The first write (the header) goes out alone; the second writes ahead.
        let ahead = crate::storage::io::write_ahead_bytes(AHEAD_SEGMENT_MAX);
        assert_eq!(
            sizes(&path),
            [(segment_name(1), HEADER_BYTES as u64 + 2 * AHEAD_RECORD as u64 + ahead)],
            "zeros written ahead"
        );
        drop(wal);
        let mut got = vec![];
        let (mut wal, report) = open_ahead(&dir, &mut got).unwrap();
        assert_eq!(
            (got.len(), report.torn_tail_bytes),
            (10, 0),
            "zeros are not a torn tail"
        );
        // After the restart the next record lands right after the last one.
        write_ahead_log(&mut wal, 11, 1100);
        drop(wal);
        let files = sizes(&path);
        assert!(files.len() > 1, "rotated: {files:?}");
        for (name, len) in &files[..files.len() - 1] {
            let bytes = std::fs::read(path.join(name)).unwrap();
            assert_ne!(bytes.last(), Some(&0), "{name} ({len} bytes) ends at its last record");
        }
        let mut got = vec![];
        let (wal, report) = open_ahead(&dir, &mut got).unwrap();
        assert_eq!(got, (1..=1100).collect::<Vec<_>>());
        assert_eq!(report.torn_tail_bytes, 0);
        drop(wal);
        // A last segment of zeros alone (no header) is refused, as before.
        std::fs::write(path.join(segment_name(1101)), vec![0u8; 4096]).unwrap();
        assert!(matches!(open_ahead(&dir, &mut vec![]), Err(WalError::Corrupt(_))));
    }

    /// A batch written over zeros ahead and cut short by a crash (its last
    /// sectors never landed) is a torn tail; a bit flip in the last record,
    /// or lost sectors followed by data, are still corruption.
    #[test]
    fn a_batch_torn_over_zeros_ahead_is_a_tail_and_damage_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, dir) = ahead_dir(tmp.path());
        let (mut wal, _) = open_ahead(&dir, &mut vec![]).unwrap();
        write_ahead_log(&mut wal, 1, 10);
        drop(wal);
        let file = path.join(segment_name(1));
        let clean = std::fs::read(&file).unwrap();
        let record_at = |k: usize| HEADER_BYTES + (k - 1) * AHEAD_RECORD; // record k, from 1
        let try_with = |bytes: &[u8]| {
            std::fs::write(&file, bytes).unwrap();
            let mut got = vec![];
            let r = open_ahead(&dir, &mut got).map(|(_, report)| (got.len(), report.torn_tail_bytes > 0));
            std::fs::write(&file, &clean).unwrap();
            r
        };
        // Every sector boundary inside record 10 at which the write stopped.
        let (start, end) = (record_at(10), record_at(10) + AHEAD_RECORD);
        let mut cuts = 0;
        for boundary in (start + 1..end).filter(|b| b % SECTOR == 0) {
            let mut b = clean.clone();
            b[boundary..].fill(0);
            assert_eq!(try_with(&b).unwrap(), (9, true), "cut at {boundary}");
            cuts += 1;
        }
        assert!(cuts >= 1);
        // A flipped bit anywhere in record 10: refused.
        for byte in start..end {
            let mut b = clean.clone();
            b[byte] ^= 0x10;
            assert!(matches!(try_with(&b), Err(WalError::Corrupt(_))), "flip at {byte}");
        }
        // A lost sector inside record 9, with record 10 after it: refused.
        let lost = record_at(9).div_ceil(SECTOR) * SECTOR;
        let mut b = clean.clone();
        b[lost..lost + SECTOR].fill(0);
        assert!(matches!(try_with(&b), Err(WalError::Corrupt(_))));
        assert_eq!(try_with(&clean).unwrap(), (10, false));

        // A record whose header (its length field) a sector boundary cuts.
        let (mut wal, _) = open_ahead(&dir, &mut vec![]).unwrap();
        let at = record_at(11) + RECORD_HEADER_BYTES + 550;
        assert_eq!(at % SECTOR, SECTOR - 2, "record 12 starts 2 bytes before a boundary");
        for (lsn, size) in [(11, 550), (12, 1000)] {
            let mut buf = Vec::new();
            frame(lsn, &vec![7u8; size], &mut buf);
            wal.write(&buf, lsn, lsn).unwrap();
        }
        drop(wal);
        let mut b = std::fs::read(&file).unwrap();
        b[at + 2..].fill(0);
        assert_eq!(try_with(&b).unwrap(), (11, true), "header cut after 2 bytes");
    }

    const AHEAD_SEGMENT_MAX: u64 = 1 << 20;
    /// A framed record of `write_ahead_log`.
    const AHEAD_RECORD: usize = RECORD_HEADER_BYTES + 1000;

    fn ahead_dir(tmp: &std::path::Path) -> (std::path::PathBuf, crate::storage::io::FsDir) {
        let path = tmp.join("wal");
        let dir =
            crate::storage::io::FsDir::preallocating(&path, crate::storage::io::write_ahead_bytes(AHEAD_SEGMENT_MAX))
                .unwrap();
        (path, dir)
    }

    fn open_ahead(dir: &crate::storage::io::FsDir, got: &mut Vec<Lsn>) -> Result<(Wal, ScanReport), WalError> {
        Wal::open(Arc::new(dir.clone()), 0, AHEAD_SEGMENT_MAX, 1, &mut |lsn, _, _| {
            got.push(lsn);
            Ok(())
        })
    }

    fn write_ahead_log(wal: &mut Wal, from: Lsn, to: Lsn) {
        for lsn in from..=to {
            let mut buf = Vec::new();
            frame(lsn, &[lsn as u8 | 1; 1000], &mut buf);
            wal.write(&buf, lsn, lsn).unwrap();
        }
    }

    fn sizes(path: &std::path::Path) -> Vec<(String, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().into_string().unwrap(), e.metadata().unwrap().len())
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn each_kind_of_node_refuses_the_others_log() {
        let (raft, _) = raft_log(1 << 20, 2);
        let err = read(&raft).unwrap_err().to_string();
        assert!(err.contains("belongs to a cluster node"), "{err}");
        let single = write_log(&[b"one"]);
        let err = Wal::open_flagged(Arc::new(single), 0, 1 << 20, 1, FLAG_RAFT, &mut |_, _, _| Ok(()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("belongs to a single node"), "{err}");
    }

    #[test]
    fn truncate_from_cuts_across_segments_and_appends_go_on() {
        // Small segments: each holds about two records.
        let (dir, mut wal) = raft_log(60, 9);
        assert!(wal.segment_count() > 2);
        wal.truncate_from(4).unwrap();
        assert_eq!(wal.next_lsn(), 4);
        let mut buf = Vec::new();
        frame(4, b"new4", &mut buf);
        wal.write(&buf, 4, 4).unwrap();
        let mut got = Vec::new();
        Wal::open_flagged(Arc::new(dir.clone()), 0, 60, 1, FLAG_RAFT, &mut |lsn, _, p| {
            got.push((lsn, p.to_vec()));
            Ok(())
        })
        .unwrap();
        let want: Vec<(Lsn, Vec<u8>)> = vec![
            (1, b"r1".to_vec()),
            (2, b"r2".to_vec()),
            (3, b"r3".to_vec()),
            (4, b"new4".to_vec()),
        ];
        assert_eq!(got, want);
        assert_eq!(wal.read_range(3, u64::MAX).unwrap().len(), 2);
        assert_eq!(wal.read_range(1, 3).unwrap().len(), 2);
    }

    #[test]
    fn reset_after_starts_the_log_past_a_snapshot() {
        let (dir, mut wal) = raft_log(60, 5);
        wal.reset_after(100).unwrap();
        assert_eq!((wal.next_lsn(), wal.segment_count()), (101, 0));
        let mut buf = Vec::new();
        frame(101, b"r101", &mut buf);
        wal.write(&buf, 101, 101).unwrap();
        let (reopened, _) = Wal::open_flagged(Arc::new(dir), 100, 60, 1, FLAG_RAFT, &mut |_, _, _| Ok(())).unwrap();
        assert_eq!(reopened.next_lsn(), 102);
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let dir = write_log(&[b"one", b"two", b"three"]);
        let (got, report) = read(&dir).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            (report.first_lsn, report.last_lsn, report.torn_tail_bytes),
            (Some(1), Some(3), 0)
        );
        // Cut the last record short: it is dropped, and the file is truncated.
        let mut files = dir.durable_files();
        let f = files.values_mut().next().unwrap();
        f.truncate(f.len() - 2);
        let dir = SimDir::from_files(files);
        let (got, report) = read(&dir).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(report.torn_tail_bytes, 16 + 5 - 2);
        let (_, report) = read(&dir).unwrap();
        assert_eq!(report.torn_tail_bytes, 0, "truncated for good");
    }

    #[test]
    fn flipped_length_bits_are_corruption_not_a_tear() {
        let dir = write_log(&[b"one", b"two"]);
        let files = dir.durable_files();
        let (name, bytes) = files.iter().next().unwrap();
        let last_record = bytes.len() - (16 + 3);
        for bit in 0..32 {
            let mut b = bytes.clone();
            b[last_record + bit / 8] ^= 1 << (bit % 8);
            let dir = SimDir::from_files([(name.clone(), b)].into());
            assert!(matches!(read(&dir), Err(WalError::Corrupt(_))), "bit {bit}");
        }
    }

    /// A failed write or sync is cut off the log before it is reported, so a
    /// restart never replays a batch whose requests were told it failed.
    #[test]
    fn a_failed_batch_is_cut_off_the_log() {
        use crate::storage::io::Faults;
        // (faults, segment bytes max): short write / failed sync, each while
        // appending to the active segment and while starting a new one.
        for (faults, segment_max) in [
            (
                Faults {
                    short_append_at: Some(3),
                    ..Faults::default()
                },
                1 << 20,
            ),
            (
                Faults {
                    fail_sync_at: Some(3),
                    ..Faults::default()
                },
                1 << 20,
            ),
            (
                Faults {
                    short_append_at: Some(3),
                    ..Faults::default()
                },
                60,
            ),
            (
                Faults {
                    fail_sync_at: Some(3),
                    ..Faults::default()
                },
                60,
            ),
        ] {
            let dir = SimDir::new();
            let (mut wal, _) = Wal::open(Arc::new(dir.clone()), 0, segment_max, 1, &mut |_, _, _| Ok(())).unwrap();
            dir.set_faults(faults);
            let mut results = Vec::new();
            for lsn in 1..=3u64 {
                let mut buf = Vec::new();
                frame(lsn, &[lsn as u8; 40], &mut buf);
                results.push(wal.write(&buf, lsn, lsn));
            }
            assert!(results[..2].iter().all(Result::is_ok), "{faults:?}");
            assert!(
                matches!(results[2], Err(WalError::Io { .. })),
                "{faults:?}: {:?}",
                results[2]
            );
            // Whatever of the failed batch reached the disk is gone: a crash
            // keeping every unsynced byte still recovers exactly 1 and 2.
            let image = dir.crash_image(|_, pending| pending);
            let (got, report) = read(&image).unwrap();
            assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2], "{faults:?}");
            assert_eq!(report.torn_tail_bytes, 0, "{faults:?}");
            assert!(matches!(wal.write(&[0u8; 20], 3, 3), Err(WalError::PreviousIo)));
        }
        // When the cut fails too, the error says the outcome is unknown.
        let dir = SimDir::new();
        let (mut wal, _) = Wal::open(Arc::new(dir.clone()), 0, 1 << 20, 1, &mut |_, _, _| Ok(())).unwrap();
        let mut buf = Vec::new();
        frame(1, b"one", &mut buf);
        wal.write(&buf, 1, 1).unwrap();
        dir.set_faults(Faults {
            short_append_at: Some(2),
            fail_undo: true,
            ..Faults::default()
        });
        buf.clear();
        frame(2, b"two", &mut buf);
        let err = wal.write(&buf, 2, 2).unwrap_err();
        assert!(matches!(err, WalError::Unrecoverable { .. }), "{err:?}");
        assert!(err.to_string().contains("outcome is unknown"), "{err}");
    }

    #[test]
    fn rotation_and_removal() {
        let dir = SimDir::new();
        let (mut wal, _) = Wal::open(Arc::new(dir.clone()), 0, 100, 1, &mut |_, _, _| Ok(())).unwrap();
        for lsn in 1..=20u64 {
            let mut buf = Vec::new();
            frame(lsn, &[7u8; 30], &mut buf);
            wal.write(&buf, lsn, lsn).unwrap();
        }
        assert!(wal.segment_count() > 5);
        let (got, _) = read(&dir).unwrap();
        assert_eq!(
            got.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
        wal.remove_through(10).unwrap();
        let mut seen = Vec::new();
        Wal::open(Arc::new(dir.clone()), 10, 100, 1, &mut |lsn, _, _| {
            seen.push(lsn);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (11..=20).collect::<Vec<_>>());
        // A gap is refused.
        let err = Wal::open(Arc::new(dir.clone()), 3, 100, 1, &mut |_, _, _| Ok(()));
        assert!(matches!(err, Err(WalError::Corrupt(_))));
    }
}
