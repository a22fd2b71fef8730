//! `--checkpoint FILE` and `--resume FILE`: the model and every part's round and clock, written
//! so that a crash at any instant leaves the previous checkpoint or the new one, never a torn
//! mix.
//!
//! The file has two header slots and two data slots. Checkpoint `n` goes to data slot `n % 2`
//! (the one the newest valid checkpoint does not use), is fsync'd, and only then is header `n % 2`
//! written (and fsync'd) to name it: sequence number, payload length, the payload's SHA-256, the
//! job's SHA-256 and the header's own. A crash while writing the data leaves the other slot and
//! its header untouched; a crash while writing the header leaves a header whose checksum fails,
//! and the other one is used. Loading takes the valid header with the highest sequence number
//! whose data also matches its hash.
//!
//! ```text
//! offset        size  content
//!      0         128  header 0 (names data slot 0), alone in its 4 KiB block
//!   4096         128  header 1 (names data slot 1), alone in its 4 KiB block
//!   8192     slot_len data slot 0: rounds (u64 per part), every worker's clock (u64 per part
//!                     and worker), model (f32)
//!   8192+slot_len      data slot 1
//! header: magic "HSCK", version u32, sequence u64, payload length u64, reserved u64,
//!         payload SHA-256, job SHA-256, SHA-256 of the 96 bytes before it
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hetsync_transport::Arena;
use sha2::{Digest, Sha256};

use crate::{Clock, Key};

const MAGIC: &[u8; 4] = b"HSCK";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 128;
/// Where header `i` is: each in its own block, so a torn block write cannot hit both.
const HEADER_AT: [u64; 2] = [0, 4096];
const DATA_AT: u64 = 8192;

/// The size of a job, as a checkpoint lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Parts.
    pub parts: usize,
    /// Workers.
    pub workers: usize,
    /// Floats of the model, all tensors.
    pub floats: usize,
}

impl Shape {
    fn payload_len(&self) -> u64 {
        (8 * self.parts + 8 * self.parts * self.workers + 4 * self.floats) as u64
    }
}

/// A checkpoint as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// Its sequence number (checkpoints written to this file before it, plus one).
    pub seq: u64,
    /// Per part, its model's round (updates applied).
    pub rounds: Vec<Clock>,
    /// Per part, every worker's clock (barrier: the part's round for everyone).
    pub clocks: Vec<Vec<Clock>>,
    /// Every part's model, in part order (every tensor in key order).
    pub model: Vec<f32>,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened, written or read.
    #[error("checkpoint {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Neither slot holds a whole checkpoint.
    #[error("checkpoint {path}: no valid checkpoint in it ({why})")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong with each slot.
        why: String,
    },
    /// It was written for another job.
    #[error("checkpoint {path} was written for another job (other tensors, partition size, worker count or policy): resume with the same options")]
    OtherJob {
        /// The file.
        path: PathBuf,
    },
}

/// The identity of a job: what must match for a checkpoint to be resumed.
pub fn job_hash(dims: &[usize], part_bytes: usize, workers: usize, policy: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hetsync-job-v1");
    for &d in dims {
        h.update((d as u64).to_le_bytes());
    }
    h.update((part_bytes as u64).to_le_bytes());
    h.update((workers as u64).to_le_bytes());
    h.update(policy.as_bytes());
    h.finalize().into()
}

/// A checkpoint file being written to.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    job: [u8; 32],
    payload_len: u64,
    slot_len: u64,
    /// The sequence number of the next checkpoint.
    next: u64,
    buf: Vec<u8>,
}

fn header(seq: u64, payload_len: u64, payload: &[u8; 32], job: &[u8; 32]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&payload_len.to_le_bytes());
    h[32..64].copy_from_slice(payload);
    h[64..96].copy_from_slice(job);
    let own: [u8; 32] = Sha256::digest(&h[..96]).into();
    h[96..128].copy_from_slice(&own);
    h
}

impl Checkpoint {
    /// Opens `path` for checkpoints of a job (`job` from [`job_hash`]) with `parts` parts of
    /// `floats` floats in all, continuing the sequence of what it holds (creating it if needed).
    pub fn open(path: &Path, job: [u8; 32], shape: Shape) -> Result<Self, CheckpointError> {
        let io_err = |op, source| CheckpointError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let payload_len = shape.payload_len();
        let slot_len = payload_len.div_ceil(4096) * 4096;
        let next = match load(path, job, shape) {
            Ok(saved) => saved.seq + 1,
            Err(CheckpointError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                1
            }
            Err(CheckpointError::Invalid { .. }) => 1,
            Err(e) => return Err(e),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        file.set_len(DATA_AT + 2 * slot_len)
            .map_err(|e| io_err("set its size", e))?;
        // The file's own entry must survive a crash too.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            job,
            payload_len,
            slot_len,
            next,
            buf: Vec::with_capacity(payload_len as usize),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a checkpoint of `arena`'s current models, each part at its round, with every
    /// part's `clocks` (one per worker); returns its sequence number. On return it is durable.
    pub fn save(&mut self, arena: &Arena, clocks: &[Vec<Clock>]) -> Result<u64, CheckpointError> {
        let parts = arena.parts().len();
        self.buf.clear();
        for key in 0..parts as Key {
            self.buf.extend_from_slice(&arena.round(key).to_le_bytes());
        }
        for &c in clocks.iter().flatten() {
            self.buf.extend_from_slice(&c.to_le_bytes());
        }
        for key in 0..parts as Key {
            self.buf
                .extend_from_slice(bytemuck::cast_slice(arena.model(key)));
        }
        assert_eq!(self.buf.len() as u64, self.payload_len, "the job's size");
        let seq = self.next;
        let slot = seq % 2;
        let io_err = |op, source| CheckpointError::Io {
            path: self.path.clone(),
            op,
            source,
        };
        self.file
            .write_all_at(&self.buf, DATA_AT + slot * self.slot_len)
            .map_err(|e| io_err("write", e))?;
        self.file.sync_data().map_err(|e| io_err("fsync", e))?;
        let digest: [u8; 32] = Sha256::digest(&self.buf).into();
        let h = header(seq, self.payload_len, &digest, &self.job);
        self.file
            .write_all_at(&h, HEADER_AT[slot as usize])
            .map_err(|e| io_err("write its header", e))?;
        self.file.sync_data().map_err(|e| io_err("fsync", e))?;
        self.next += 1;
        Ok(seq)
    }
}

/// Loads the newest whole checkpoint of job `job` (of `parts` parts, `floats` floats) from
/// `path`.
pub fn load(path: &Path, job: [u8; 32], shape: Shape) -> Result<Saved, CheckpointError> {
    let expected = shape.payload_len();
    let io_err = |op, source| CheckpointError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = File::open(path).map_err(|e| io_err("open", e))?;
    let mut heads = [0u8; 2 * HEADER_LEN];
    let mut got = [0usize; 2];
    for (i, at) in HEADER_AT.iter().enumerate() {
        let buf = &mut heads[i * HEADER_LEN..(i + 1) * HEADER_LEN];
        got[i] = file.read_at(buf, *at).map_err(|e| io_err("read", e))?;
    }
    let mut why = Vec::new();
    let mut best: Option<Saved> = None;
    let mut other_job = false;
    for slot in 0..2u64 {
        let h = &heads[slot as usize * HEADER_LEN..(slot as usize + 1) * HEADER_LEN];
        if got[slot as usize] < HEADER_LEN || &h[0..4] != MAGIC {
            why.push(format!("slot {slot}: never written"));
            continue;
        }
        let own: [u8; 32] = Sha256::digest(&h[..96]).into();
        if h[96..128] != own || u32::from_le_bytes(h[4..8].try_into().unwrap()) != VERSION {
            why.push(format!("slot {slot}: torn or foreign header"));
            continue;
        }
        if h[64..96] != job {
            other_job = true;
            continue;
        }
        let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let len = u64::from_le_bytes(h[16..24].try_into().unwrap());
        if len != expected {
            why.push(format!(
                "slot {slot}: a payload of {len} bytes, not {expected}"
            ));
            continue;
        }
        if best.as_ref().is_some_and(|b| b.seq > seq) {
            continue;
        }
        let slot_len = len.div_ceil(4096) * 4096;
        let mut data = vec![0u8; len as usize];
        if file
            .read_exact_at(&mut data, DATA_AT + slot * slot_len)
            .is_err()
            || Sha256::digest(&data)[..] != h[32..64]
        {
            why.push(format!("slot {slot}: data does not match its header"));
            continue;
        }
        best = Some(decode(seq, &data, shape));
    }
    match best {
        Some(s) => Ok(s),
        None if other_job => Err(CheckpointError::OtherJob {
            path: path.to_path_buf(),
        }),
        None => Err(CheckpointError::Invalid {
            path: path.to_path_buf(),
            why: why.join("; "),
        }),
    }
}

/// Splits a payload of a job of this shape: rounds, clocks, model.
fn decode(seq: u64, data: &[u8], shape: Shape) -> Saved {
    let u64_at = |i: usize| u64::from_le_bytes(data[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    let (p, w) = (shape.parts, shape.workers);
    Saved {
        seq,
        rounds: (0..p).map(u64_at).collect(),
        clocks: (0..p)
            .map(|k| (0..w).map(|r| u64_at(p + k * w + r)).collect())
            .collect(),
        model: bytemuck::pod_collect_to_vec(&data[8 * (p + p * w)..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetsync_transport::protocol::Parts;
    use hetsync_transport::Update;

    /// An arena of one worker whose every part's model is `value` at round `round`.
    fn arena(value: f32, round: Clock) -> Arena {
        let mut a = Arena::new(1, Parts::new(&[300, 7], 1024).unwrap()).unwrap();
        for key in 0..a.parts().len() as Key {
            let n = a.parts()[key].len;
            a.restore(key, &vec![value; n], round);
        }
        a
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hetsync-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("ckpt")
    }

    const JOB: [u8; 32] = [1; 32];
    const SHAPE: Shape = Shape {
        parts: 3,
        workers: 1,
        floats: 307,
    };

    #[test]
    fn the_newest_whole_checkpoint_is_loaded_and_a_torn_one_falls_back_to_the_previous() {
        let path = scratch("torn");
        let mut c = Checkpoint::open(&path, JOB, SHAPE).unwrap();
        assert_eq!(
            c.save(&arena(1.5, 10), &[vec![9], vec![9], vec![10]])
                .unwrap(),
            1
        );
        assert_eq!(
            c.save(&arena(2.5, 20), &[vec![19], vec![20], vec![20]])
                .unwrap(),
            2
        );
        let s = load(&path, JOB, SHAPE).unwrap();
        assert_eq!(
            (s.seq, s.rounds.clone(), s.clocks.clone()),
            (2, vec![20; 3], vec![vec![19], vec![20], vec![20]])
        );
        assert!(s.model.iter().all(|&m| m == 2.5) && s.model.len() == SHAPE.floats);
        let slot_len = SHAPE.payload_len().div_ceil(4096) * 4096;
        let copy = path.with_extension("orig");
        std::fs::copy(&path, &copy).unwrap();
        let torn = |at: u64| {
            std::fs::copy(&copy, &path).unwrap();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[0xff; 10], at).unwrap();
            load(&path, JOB, SHAPE).unwrap()
        };
        // Checkpoint 1 went to slot 1, 2 to slot 0. A crash while writing 3's data (slot 1)
        // leaves 2 untouched.
        assert_eq!(torn(DATA_AT + slot_len).seq, 2);
        // A crash while writing 2's header leaves 1, whole.
        let s = torn(40);
        assert_eq!((s.seq, s.rounds[0], s.clocks[0][0]), (1, 10, 9));
        assert!(s.model.iter().all(|&m| m == 1.5));
        // Data that no longer matches its header (a bad disk) is not used either.
        assert_eq!(torn(DATA_AT + 8).seq, 1);
        // Both gone: a clear error, and reopening starts the sequence anew.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 10], HEADER_AT[1] + 40).unwrap();
        assert!(matches!(
            load(&path, JOB, SHAPE),
            Err(CheckpointError::Invalid { .. })
        ));
        let mut c = Checkpoint::open(&path, JOB, SHAPE).unwrap();
        assert_eq!(
            c.save(&arena(3.5, 30), &[vec![30], vec![30], vec![30]])
                .unwrap(),
            1
        );
        // Reopening a file with valid checkpoints continues their sequence.
        let mut c = Checkpoint::open(&copy, JOB, SHAPE).unwrap();
        assert_eq!(
            c.save(&arena(3.5, 30), &[vec![30], vec![30], vec![30]])
                .unwrap(),
            3
        );
        assert_eq!(load(&copy, JOB, SHAPE).unwrap().rounds, vec![30; 3]);
    }

    #[test]
    fn another_jobs_checkpoint_is_refused() {
        let path = scratch("other");
        let mut c = Checkpoint::open(&path, JOB, SHAPE).unwrap();
        c.save(&arena(1.0, 1), &[vec![1], vec![1], vec![1]])
            .unwrap();
        assert!(matches!(
            load(&path, [2; 32], SHAPE),
            Err(CheckpointError::OtherJob { .. })
        ));
        assert!(matches!(
            Checkpoint::open(&path, [2; 32], SHAPE),
            Err(CheckpointError::OtherJob { .. })
        ));
        // The arena's versions are what a send would read: restore writes the current one.
        let mut a = arena(0.0, 0);
        a.receive_into(0, 0).unwrap().fill(0);
        a.hand_over(0, 0, 0).unwrap();
        a.update(0, &[0], |t, _| {
            if let Update::InPlace(m) = t {
                m.fill(4.0)
            }
        })
        .unwrap();
        assert_eq!(a.round(0), 1);
    }
}
