//! The corruption matrix over a real WAL written by the engine: truncation at
//! every byte of the last segment, every single-bit flip, every zeroed 512-byte
//! sector, huge length fields, and damage in a segment that is not the last.
//! Tail cases (the log cut short, or zeros after the last whole record) must
//! recover exactly the clean prefix; everything else must be refused.

use std::collections::BTreeMap;
use std::sync::Arc;

use quotad::config::{Config, StorageConfig};
use quotad::engine::{DecideOp, DecisionRequest, Engine, Finish, Policy};
use quotad::storage::io::SimDir;
use quotad::storage::snapshot::SnapshotStore;
use quotad::storage::{Storage, StorageError};

const CONFIG: &str = r#"
[engine]
shards = 4
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "day"
  metric = "tokens"
  period = "1d"
  max = 1000000
  [[plans.limits]]
  name = "bucket"
  algorithm = "token_bucket"
  max = 100
  period = "1m"
"#;
const NOW: u64 = 1_795_255_200_000;

/// Compiled once: tens of thousands of recoveries run below.
fn policy() -> Policy {
    static POLICY: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    POLICY
        .get_or_init(|| Policy::from_config(&Config::from_toml(CONFIG, "t.toml").unwrap()).unwrap())
        .clone()
}

fn open(files: BTreeMap<String, Vec<u8>>, segment_bytes_max: u64) -> Result<(Engine, Storage), StorageError> {
    let config = StorageConfig {
        segment_bytes_max,
        ..StorageConfig::default()
    };
    let dir = SimDir::from_files(files);
    // One empty store for all variants (nothing here writes a snapshot): opening
    // a database per variant would dominate the run time.
    static SNAPSHOTS: std::sync::OnceLock<SnapshotStore> = std::sync::OnceLock::new();
    let snaps = SNAPSHOTS.get_or_init(SnapshotStore::in_memory).clone();
    Storage::open_with(&config, policy(), Arc::new(dir), snaps, None, Default::default()).map(|(e, s, _)| (e, s))
}

/// A small log of varied records: consumes with keys, a reservation, a commit.
fn build_log(ops: u64, segment_bytes_max: u64) -> BTreeMap<String, Vec<u8>> {
    let dir = SimDir::new();
    let config = StorageConfig {
        segment_bytes_max,
        ..StorageConfig::default()
    };
    let (engine, storage, _) = Storage::open_with(
        &config,
        policy(),
        Arc::new(dir.clone()),
        SnapshotStore::in_memory(),
        None,
        Default::default(),
    )
    .unwrap();
    let req = |i: u64, key: bool| DecisionRequest {
        subject: format!("user:{}", i % 3),
        event: None,
        attributes: BTreeMap::new(),
        amounts: BTreeMap::from([("tokens".to_string(), 10 + i)]),
        idempotency_key: key.then(|| format!("key-{i}")),
        ttl_ms: None,
        priority: None,
    };
    for i in 0..ops {
        let a = engine.decide(DecideOp::Consume, &req(i, i % 2 == 0), NOW + i).unwrap();
        storage.journal().wait_durable_blocking(a.lsn.unwrap()).unwrap();
    }
    let r = engine
        .decide(DecideOp::Reserve, &req(100, true), NOW + 100)
        .unwrap()
        .value;
    let c = engine
        .finish(
            r.reservation_id.as_ref().unwrap(),
            Finish::Commit(BTreeMap::from([("tokens".into(), 3)])),
            NOW + 101,
        )
        .unwrap();
    storage.journal().wait_durable_blocking(c.lsn.unwrap()).unwrap();
    drop(storage);
    dir.durable_files()
}

/// (start, end) of each record in a segment.
fn records(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = 24;
    while off < bytes.len() {
        let len = (u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) & 0x00FF_FFFF) as usize;
        out.push((off, off + 16 + len));
        off += 16 + len;
    }
    out
}

/// Digest of the state after recovering from `bytes` as the only segment.
fn digest(name: &str, bytes: &[u8]) -> Result<(u64, u64), StorageError> {
    let (engine, _storage) = open(BTreeMap::from([(name.to_string(), bytes.to_vec())]), 1 << 20)?;
    let d = engine.digest(NOW + 1000);
    Ok((d.sum, d.counters + d.idempotency_keys + d.reservations))
}

#[test]
fn corruption_matrix() {
    let files = build_log(8, 1 << 20);
    assert_eq!(files.len(), 1);
    let (name, log) = files.into_iter().next().unwrap();
    let recs = records(&log);
    assert_eq!(recs.last().unwrap().1, log.len());
    // The state after each clean prefix of k records.
    let prefix: Vec<(u64, u64)> = (0..=recs.len())
        .map(|k| digest(&name, &log[..if k == 0 { 24 } else { recs[k - 1].1 }]).unwrap())
        .collect();
    let whole_records = |cut: usize| recs.iter().filter(|r| r.1 <= cut).count();
    let (mut recovered, mut refused) = (0u64, 0u64);

    // 1. Truncation at every byte: always the clean prefix of whole records.
    for cut in 0..=log.len() {
        let got = digest(&name, &log[..cut]).unwrap_or_else(|e| panic!("truncation at {cut} refused: {e}"));
        assert_eq!(got, prefix[whole_records(cut)], "truncation at {cut}");
        recovered += 1;
    }
    let truncations = log.len() + 1;

    // 2. Every single-bit flip: always refused.
    for byte in 0..log.len() {
        for bit in 0..8 {
            let mut b = log.clone();
            b[byte] ^= 1 << bit;
            match digest(&name, &b) {
                Err(StorageError::Corrupt(msg)) => {
                    assert!(
                        msg.contains(&name) && msg.contains("at byte"),
                        "names file and offset: {msg}"
                    );
                    refused += 1;
                }
                other => panic!("bit {bit} of byte {byte} flipped: {other:?}"),
            }
        }
    }
    let flips = log.len() * 8;

    // 3. Zeroed 512-byte sectors: a tail case only if zeros run from a record
    //    boundary to the end; anything else is refused.
    let mut sectors = 0;
    for start in (0..log.len()).step_by(512) {
        let end = (start + 512).min(log.len());
        let mut b = log.clone();
        b[start..end].fill(0);
        sectors += 1;
        let first_hit = recs.iter().position(|r| r.1 > start);
        let tail_case =
            start >= 24 && end == log.len() && first_hit.is_some_and(|k| b[recs[k].0..].iter().all(|&x| x == 0));
        match (digest(&name, &b), tail_case) {
            (Ok(got), true) => {
                assert_eq!(got, prefix[first_hit.unwrap()], "zeroed tail sector at {start}");
                recovered += 1;
            }
            (Err(StorageError::Corrupt(_)), false) => refused += 1,
            (other, _) => panic!("zeroed sector at {start} (tail case: {tail_case}): {other:?}"),
        }
    }

    // 4. Huge length fields in every record: refused before anything is allocated.
    let mut huge = 0;
    for &(off, _) in &recs {
        let check = |len: u32| {
            let b = len.to_le_bytes();
            len | (u32::from(b[0] ^ b[1] ^ b[2] ^ 0xA5) << 24)
        };
        for field in [u32::MAX, check(0x00FF_FFFF), check((4 << 20) + 1), check(0)] {
            let mut b = log.clone();
            b[off..off + 4].copy_from_slice(&field.to_le_bytes());
            assert!(
                matches!(digest(&name, &b), Err(StorageError::Corrupt(_))),
                "length {field:#x} at {off}"
            );
            huge += 1;
            refused += 1;
        }
    }

    println!(
        "corruption matrix on a {}-byte log of {} records: {truncations} truncations, {flips} bit flips, \
         {sectors} zeroed sectors, {huge} huge lengths; {recovered} recovered a clean prefix, {refused} refused",
        log.len(),
        recs.len()
    );
    assert_eq!(recovered + refused, (truncations + flips + sectors + huge) as u64);
}

#[test]
fn damage_in_an_earlier_segment_is_refused_even_at_its_end() {
    // Tiny segments: the log spans several files.
    let files = build_log(40, 1 << 20);
    let mut multi = BTreeMap::new();
    // Re-split the single segment into two files at a record boundary.
    let (name, log) = files.into_iter().next().unwrap();
    let recs = records(&log);
    let split = recs[20].0;
    let second_first_lsn = 21u64;
    let mut second =
        quotad::storage::wal::encode_header(quotad::storage::codec::FORMAT_VERSION, second_first_lsn).to_vec();
    second.extend_from_slice(&log[split..]);
    multi.insert(name.clone(), log[..split].to_vec());
    multi.insert(quotad::storage::wal::segment_name(second_first_lsn), second);
    let (engine, _s) = open(multi.clone(), 1 << 20).expect("a clean two-segment log recovers");
    let whole = engine.digest(NOW + 1000);
    let (single, _s) = open(BTreeMap::from([(name.clone(), log.clone())]), 1 << 20).unwrap();
    assert_eq!(
        whole,
        single.digest(NOW + 1000),
        "splitting into segments changes nothing"
    );
    // Cut the first segment short: that is not a torn tail, it is lost data.
    let mut cut = multi.clone();
    cut.get_mut(&name).unwrap().truncate(split - 3);
    assert!(matches!(open(cut, 1 << 20), Err(StorageError::Corrupt(_))));
    // Delete the first segment: the log no longer starts at the beginning.
    let mut gap = multi.clone();
    gap.remove(&name);
    assert!(matches!(open(gap, 1 << 20), Err(StorageError::Corrupt(_))));
}
