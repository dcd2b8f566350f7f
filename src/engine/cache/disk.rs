//! KV snapshots on disk, surviving restarts.
//!
//! One file per snapshot, named by a hash of its rendered text prefix:
//!
//! ```text
//! header (128 bytes, little-endian)
//!   magic "HEARTHKV" | format version u32 | header length u32
//!   model fingerprint [32] | context size u32 | token count u32
//!   created u64 | last used u64 | hits u64   (Unix seconds; updated in place)
//!   text length u64 | state length u64 | SHA-256 of the payload [32]
//! payload
//!   rendered text | piece lengths (u32 each) | token ids (i32 each) | llama.cpp sequence state
//! ```
//!
//! Files are written to a temporary name, synced and renamed, so a crash
//! never leaves a torn snapshot under a real name. A file that is corrupt,
//! truncated, from another format version or another model is logged,
//! removed and never trusted. Writing happens on a thread of its own: the
//! engine only pays for copying the state out.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::sequence::Sequence;

pub const MAGIC: &[u8; 8] = b"HEARTHKV";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
const EXT: &str = "kv";

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub model: [u8; 32],
    pub n_ctx: u32,
    pub token_count: u32,
    pub created: u64,
    pub last_used: u64,
    pub hits: u64,
    pub text_len: u64,
    pub state_len: u64,
    pub checksum: [u8; 32],
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..48].copy_from_slice(&self.model);
        b[48..52].copy_from_slice(&self.n_ctx.to_le_bytes());
        b[52..56].copy_from_slice(&self.token_count.to_le_bytes());
        b[56..64].copy_from_slice(&self.created.to_le_bytes());
        b[64..72].copy_from_slice(&self.last_used.to_le_bytes());
        b[72..80].copy_from_slice(&self.hits.to_le_bytes());
        b[80..88].copy_from_slice(&self.text_len.to_le_bytes());
        b[88..96].copy_from_slice(&self.state_len.to_le_bytes());
        b[96..128].copy_from_slice(&self.checksum);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err("shorter than a header".into());
        }
        if &b[0..8] != MAGIC {
            return Err("not a hearth KV snapshot (bad magic)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("format version {version}, expected {VERSION}"));
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err("unexpected header length".into());
        }
        let mut model = [0u8; 32];
        model.copy_from_slice(&b[16..48]);
        let mut checksum = [0u8; 32];
        checksum.copy_from_slice(&b[96..128]);
        Ok(Header {
            version,
            model,
            n_ctx: u32_at(48),
            token_count: u32_at(52),
            created: u64_at(56),
            last_used: u64_at(64),
            hits: u64_at(72),
            text_len: u64_at(80),
            state_len: u64_at(88),
            checksum,
        })
    }

    /// The file size this header promises.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + self.text_len + 8 * self.token_count as u64 + self.state_len
    }
}

/// Everything but the state: enough to match a prompt against.
#[derive(Debug, Clone)]
pub struct DiskEntry {
    pub path: PathBuf,
    pub header: Header,
    pub seq: Sequence,
}

/// Read a snapshot's header and sequence (not its state), checking what
/// can be checked without hashing the whole file.
pub fn read_entry(path: &Path) -> Result<DiskEntry, String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut hb = [0u8; HEADER_LEN];
    f.read_exact(&mut hb)
        .map_err(|_| "truncated header".to_string())?;
    let header = Header::decode(&hb)?;
    if header.file_len() != len {
        return Err(format!(
            "truncated or padded: {len} bytes, header says {}",
            header.file_len()
        ));
    }
    let n = header.token_count as usize;
    let mut text = vec![0u8; header.text_len as usize];
    f.read_exact(&mut text).map_err(|e| e.to_string())?;
    let mut raw = vec![0u8; 8 * n];
    f.read_exact(&mut raw).map_err(|e| e.to_string())?;
    let lens: Vec<usize> = raw[..4 * n]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default()) as usize)
        .collect();
    let tokens: Vec<i32> = raw[4 * n..]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Ok(DiskEntry {
        path: path.to_path_buf(),
        header,
        seq: Sequence::from_parts(tokens, text, &lens),
    })
}

/// Read a whole snapshot and verify its checksum. Returns the state bytes.
fn read_state(path: &Path, header: &Header) -> Result<Vec<u8>, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    if bytes.len() as u64 != header.file_len() {
        return Err("file changed size".into());
    }
    let payload = &bytes[HEADER_LEN..];
    let sum: [u8; 32] = Sha256::digest(payload).into();
    if sum != header.checksum {
        return Err("payload checksum mismatch (corrupt)".into());
    }
    Ok(payload[payload.len() - header.state_len as usize..].to_vec())
}

/// The file name for a sequence: a hash of its rendered text (of its
/// tokens when the text is unknown).
pub fn file_name(seq: &Sequence) -> String {
    let mut h = Sha256::new();
    if seq.text_ok() && !seq.text().is_empty() {
        h.update(b"text:");
        h.update(seq.text());
    } else {
        h.update(b"tokens:");
        for t in seq.tokens() {
            h.update(t.to_le_bytes());
        }
    }
    format!("{}.{EXT}", &hex::encode(h.finalize())[..32])
}

fn encode_payload(seq: &Sequence, state: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(seq.text().len() + 8 * seq.len() + state.len());
    p.extend_from_slice(seq.text());
    for l in seq.piece_lens() {
        p.extend_from_slice(&(l as u32).to_le_bytes());
    }
    for t in seq.tokens() {
        p.extend_from_slice(&t.to_le_bytes());
    }
    p.extend_from_slice(state);
    p
}

/// Write a snapshot atomically: temporary file, sync, rename.
pub fn write_snapshot(
    dir: &Path,
    model: [u8; 32],
    n_ctx: u32,
    seq: &Sequence,
    state: &[u8],
) -> std::io::Result<(PathBuf, Header)> {
    let payload = encode_payload(seq, state);
    let now = now_secs();
    let header = Header {
        version: VERSION,
        model,
        n_ctx,
        token_count: seq.len() as u32,
        created: now,
        last_used: now,
        hits: 0,
        text_len: seq.text().len() as u64,
        state_len: state.len() as u64,
        checksum: Sha256::digest(&payload).into(),
    };
    let path = dir.join(file_name(seq));
    let tmp = dir.join(format!(".{}.tmp-{}", file_name(seq), std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&header.encode())?;
        f.write_all(&payload)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    Ok((path, header))
}

/// How eviction ranks a snapshot: hit often, used recently and many
/// tokens per byte are worth keeping.
fn keep_score(h: &Header, size: u64, now: u64) -> f64 {
    let age_hours = now.saturating_sub(h.last_used) as f64 / 3600.0;
    (h.hits as f64 + 1.0) * (h.token_count as f64 + 1.0) / (size.max(1) as f64) / (1.0 + age_hours)
}

enum WriteJob {
    Save(Sequence, Arc<Vec<u8>>),
    Flush(mpsc::Sender<()>),
}

/// The on-disk store: an in-memory index of every valid file, and a writer
/// thread.
pub struct DiskStore {
    dir: PathBuf,
    model: [u8; 32],
    n_ctx: u32,
    budget: u64,
    index: Arc<Mutex<Vec<DiskEntry>>>,
    writer: SyncSender<WriteJob>,
}

fn remove_bad(path: &Path, why: &str) {
    warn!(file = %path.display(), reason = why, "KV snapshot ignored and removed");
    let _ = fs::remove_file(path);
}

impl DiskStore {
    /// Open (creating) the directory and index what is valid in it.
    pub fn open(
        dir: &Path,
        model: [u8; 32],
        n_ctx: u32,
        budget: u64,
    ) -> std::io::Result<DiskStore> {
        fs::create_dir_all(dir)?;
        let mut entries = Vec::new();
        for item in fs::read_dir(dir)? {
            let path = item?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') && name.contains(".tmp-") {
                // A write that never finished.
                let _ = fs::remove_file(&path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            match read_entry(&path) {
                Ok(e) if e.header.model != model => remove_bad(&path, "computed by another model"),
                Ok(e) if e.header.token_count == 0 => remove_bad(&path, "empty"),
                Ok(e) => entries.push(e),
                Err(why) => remove_bad(&path, &why),
            }
        }
        info!(dir = %dir.display(), snapshots = entries.len(), "KV disk cache opened");
        let index = Arc::new(Mutex::new(entries));
        let (tx, rx) = mpsc::sync_channel::<WriteJob>(2);
        let (wdir, windex) = (dir.to_path_buf(), index.clone());
        std::thread::Builder::new().name("hearth-kv-writer".into()).spawn(move || {
            for job in rx {
                match job {
                    WriteJob::Save(seq, state) => match write_snapshot(&wdir, model, n_ctx, &seq, &state) {
                        Ok((path, header)) => {
                            info!(file = %path.display(), tokens = seq.len(), bytes = header.file_len(), "KV snapshot saved");
                            let mut idx = windex.lock().unwrap_or_else(|p| p.into_inner());
                            idx.retain(|e| e.path != path);
                            idx.push(DiskEntry { path, header, seq });
                            evict(&mut idx, budget);
                        }
                        Err(err) => warn!(cause = %err, "KV snapshot not saved"),
                    },
                    WriteJob::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        })?;
        Ok(DiskStore {
            dir: dir.to_path_buf(),
            model,
            n_ctx,
            budget,
            index,
            writer: tx,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queue a snapshot for writing. Never waits: when the writer is busy
    /// the snapshot is skipped (a later frontier will save a longer one).
    pub fn save(&self, seq: Sequence, state: Arc<Vec<u8>>) {
        match self.writer.try_send(WriteJob::Save(seq, state)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => info!("KV snapshot skipped: the disk writer is busy"),
            Err(TrySendError::Disconnected(_)) => {
                warn!("KV snapshot skipped: the disk writer stopped")
            }
        }
    }

    /// Queue a snapshot and wait until everything queued is on disk
    /// (shutdown).
    pub fn save_and_flush(&self, save: Option<(Sequence, Arc<Vec<u8>>)>) {
        if let Some((seq, state)) = save {
            let _ = self.writer.send(WriteJob::Save(seq, state));
        }
        let (tx, rx) = mpsc::channel();
        if self.writer.send(WriteJob::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Run `f` over the index (for matching).
    pub fn with_entries<R>(&self, f: impl FnOnce(&[DiskEntry]) -> R) -> R {
        let idx = self.index.lock().unwrap_or_else(|p| p.into_inner());
        f(&idx)
    }

    /// Load a snapshot's state, verifying it. A bad file is removed.
    pub fn load(&self, path: &Path) -> Option<(Sequence, Vec<u8>)> {
        let entry = self.with_entries(|es| es.iter().find(|e| e.path == path).cloned())?;
        if entry.header.token_count >= self.n_ctx {
            return None;
        }
        match read_state(path, &entry.header) {
            Ok(state) => {
                self.touch(&entry);
                Some((entry.seq, state))
            }
            Err(why) => {
                remove_bad(path, &why);
                self.index
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|e| e.path != path);
                None
            }
        }
    }

    /// Forget a snapshot that llama.cpp refused.
    pub fn discard(&self, path: &Path, why: &str) {
        remove_bad(path, why);
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| e.path != path);
    }

    /// Record a hit: last-used time and hit count, in the header in place.
    fn touch(&self, entry: &DiskEntry) {
        let mut header = entry.header.clone();
        header.hits += 1;
        header.last_used = now_secs();
        let res = OpenOptions::new()
            .write(true)
            .open(&entry.path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(0))?;
                f.write_all(&header.encode())
            });
        if res.is_ok() {
            let mut idx = self.index.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = idx.iter_mut().find(|e| e.path == entry.path) {
                e.header = header;
            }
        }
    }

    pub fn model(&self) -> [u8; 32] {
        self.model
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }
}

/// Remove the least valuable snapshots until the total fits the budget.
fn evict(idx: &mut Vec<DiskEntry>, budget: u64) {
    let now = now_secs();
    let mut total: u64 = idx.iter().map(|e| e.header.file_len()).sum();
    while total > budget && !idx.is_empty() {
        let (worst, _) = idx
            .iter()
            .enumerate()
            .map(|(i, e)| (i, keep_score(&e.header, e.header.file_len(), now)))
            .fold(
                (0, f64::INFINITY),
                |best, cur| if cur.1 < best.1 { cur } else { best },
            );
        let e = idx.remove(worst);
        total -= e.header.file_len();
        info!(file = %e.path.display(), tokens = e.header.token_count, "KV snapshot evicted (disk budget)");
        let _ = fs::remove_file(&e.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sequence {
        let mut s = Sequence::default();
        for (i, p) in ["<s>", "Hello", " world"].iter().enumerate() {
            s.push(i as i32 + 1, p.as_bytes());
        }
        s
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hearth-disk-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            version: VERSION,
            model: [7; 32],
            n_ctx: 8192,
            token_count: 3,
            created: 1,
            last_used: 2,
            hits: 3,
            text_len: 4,
            state_len: 5,
            checksum: [9; 32],
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Header::decode(&bad).is_err());
    }

    #[test]
    fn write_read_verify_and_reject_damage() {
        let dir = tmpdir("rw");
        let (path, _) = write_snapshot(&dir, [1; 32], 512, &sample(), b"STATE").unwrap();
        let e = read_entry(&path).unwrap();
        assert_eq!(e.seq.tokens(), &[1, 2, 3]);
        assert_eq!(e.seq.text_match("<s>Hello world!"), (3, 14));
        assert_eq!(read_state(&path, &e.header).unwrap(), b"STATE");
        // Flip one payload byte: the checksum catches it.
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(read_state(&path, &e.header).is_err());
        // Truncate: the header's promised length catches it.
        fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(read_entry(&path).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn open_removes_foreign_and_broken_files() {
        let dir = tmpdir("open");
        write_snapshot(&dir, [1; 32], 512, &sample(), b"S").unwrap();
        let mut other = sample();
        other.push(9, b"!");
        write_snapshot(&dir, [2; 32], 512, &other, b"S").unwrap();
        fs::write(dir.join("junk.kv"), b"not a snapshot").unwrap();
        fs::write(dir.join(".x.kv.tmp-1"), b"half").unwrap();
        let store = DiskStore::open(&dir, [1; 32], 512, u64::MAX).unwrap();
        assert_eq!(store.with_entries(|e| e.len()), 1);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn eviction_prefers_hit_and_recent_snapshots() {
        let now = now_secs();
        let h = |hits, last_used| Header {
            version: VERSION,
            model: [0; 32],
            n_ctx: 0,
            token_count: 100,
            created: 0,
            last_used,
            hits,
            text_len: 0,
            state_len: 1000,
            checksum: [0; 32],
        };
        assert!(keep_score(&h(5, now), 1000, now) > keep_score(&h(0, now), 1000, now));
        assert!(keep_score(&h(0, now), 1000, now) > keep_score(&h(0, now - 86_400), 1000, now));
    }
}
