//! What the server tells the world: the progress line and the saved model (the trace is in
//! `trace.rs`).

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;
use std::time::Instant;

use hetsync_transport::Arena;

use super::ServerStats;

/// Progress since the last progress line.
#[derive(Debug)]
pub(crate) struct Window {
    pub at: Instant,
    pub rounds: u64,
    pub key_rounds: u64,
    pub participants: u64,
    pub applied: u64,
}

impl Window {
    /// A window opening at `at` with the counters of `s`.
    pub fn open(at: Instant, s: &ServerStats) -> Self {
        Self {
            at,
            rounds: s.rounds,
            key_rounds: s.key_rounds,
            participants: s.participants,
            applied: s.pushes_applied,
        }
    }
}

/// Prints one progress line for the window ending `now`, and opens the next window. `clocked`:
/// the policy is a vector clock (pushes applied one by one, no rounds).
pub(crate) fn progress(
    w: &mut Window,
    now: Instant,
    s: &ServerStats,
    members: usize,
    workers: usize,
    clocked: bool,
) {
    let secs = (now - w.at).as_secs_f64().max(1e-9);
    let applied = (s.pushes_applied - w.applied) as f64 / secs;
    if clocked {
        eprintln!(
            "hetsync server: slowest clock {} | {applied:.1} pushes applied/s | gradients applied {} | workers {members}/{workers}",
            s.rounds, s.pushes_applied,
        );
    } else {
        let key_rounds = s.key_rounds - w.key_rounds;
        let mean = if key_rounds == 0 {
            0.0
        } else {
            (s.participants - w.participants) as f64 / key_rounds as f64
        };
        eprintln!(
            "hetsync server: round {} | {:.1} rounds/s | participants {mean:.2}/{workers} | gradients on time {} folded {} dropped {} | stragglers left behind {} | workers {members}/{workers}",
            s.rounds,
            (s.rounds - w.rounds) as f64 / secs,
            s.participants,
            s.late_folded,
            s.dropped,
            s.stragglers,
        );
    }
    *w = Window::open(now, s);
}

/// Writes every tensor's model, in key order, as raw little-endian f32 to `path`: through a
/// temporary file in the same directory, fsync'd, then renamed over `path`, so a crash leaves the
/// old file or the new one, never a torn mix.
pub(crate) fn save_model(path: &Path, arena: &Arena) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> io::Result<()> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        arena.write_models(&mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced (best effort: some file
        // systems refuse to open a directory for this).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetsync_transport::protocol::Parts;

    #[test]
    fn the_saved_model_is_every_tensor_in_key_order_and_replaces_the_old_file_whole() {
        let dir = std::env::temp_dir().join(format!("hetsync-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.f32");
        std::fs::write(&path, b"old").unwrap();
        let mut arena = Arena::new(1, Parts::new(&[3, 300], 1024).unwrap()).unwrap();
        for key in 0..arena.parts().len() as u32 {
            arena.receive_into(0, key).unwrap().fill(0x3f); // 0x3f3f3f3f as f32: 0.7470...
            arena.hand_over(0, key, 0).unwrap();
            arena
                .update(key, &[0], |target, g| match target {
                    hetsync_transport::Update::InPlace(m) => m.copy_from_slice(g[0]),
                    hetsync_transport::Update::Into { next, .. } => next.copy_from_slice(g[0]),
                })
                .unwrap();
        }
        save_model(&path, &arena).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4 * 303);
        assert!(bytes.iter().all(|&b| b == 0x3f));
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary file left behind");
        // A save that cannot complete leaves the old file untouched.
        let missing = dir.join("no-such-dir").join("model.f32");
        assert!(save_model(&missing, &arena).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
