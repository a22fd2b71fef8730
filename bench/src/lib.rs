//! Inputs shared by Het-Sync's criterion benches: deterministic gradient data laid out the way the
//! server's arena lays it out.

#![deny(missing_docs)]

use hetsync::protocol::{Parts, HEADER_LEN, MIN_PART_BYTES};
use hetsync_transport::{Arena, Update};

/// `k` gradient buffers of `n` floats each plus a model, deterministic, all distinct.
#[derive(Debug)]
pub struct Gradients {
    /// The model the gradients are summed into.
    pub model: Vec<f32>,
    /// The gradients.
    pub grads: Vec<Vec<f32>>,
}

impl Gradients {
    /// Makes `k` gradients of `n` floats.
    pub fn new(k: usize, n: usize) -> Self {
        let gen = |seed: u64| -> Vec<f32> {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        Self {
            model: gen(0),
            grads: (1..=k as u64).map(gen).collect(),
        }
    }

    /// The gradients as slices, as the engine takes them.
    pub fn views(&self) -> Vec<&[f32]> {
        self.grads.iter().map(Vec::as_slice).collect()
    }
}

/// Bytes one push of `n` floats puts on the wire.
pub fn push_bytes(n: usize) -> usize {
    HEADER_LEN + 4 * n
}

/// `k` gradients of `n` floats held in the server's own arena ([`Arena`]: a job of one `n`-float
/// part and `k` workers), so a bench sums memory laid out exactly where the server sums it: the
/// worker slots are staggered off 4 KiB multiples by the arena's own rule, not all 4 KiB-aligned
/// alike. `hetsync bench aggregate` (src/cli/bench_aggregate.rs) sets up the same.
#[derive(Debug)]
pub struct ArenaGradients {
    arena: Arena,
    k: usize,
}

impl ArenaGradients {
    /// Maps the arena and fills the `k` slots with deterministic data, held by the server.
    ///
    /// # Panics
    /// If the arena cannot be mapped.
    pub fn new(k: usize, n: usize) -> Self {
        let parts = Parts::new(&[n], (4 * n).next_multiple_of(MIN_PART_BYTES)).expect("one part");
        let mut arena = Arena::new(k, parts).expect("mapping the arena");
        let data = Gradients::new(k, n);
        for (rank, g) in (0..).zip(&data.grads) {
            let slot = arena
                .receive_into(rank, 0)
                .expect("a new arena lends every slot");
            slot.copy_from_slice(&le_bytes(g));
            arena.hand_over(rank, 0, 0).expect("the slot was lent");
        }
        Self { arena, k }
    }

    /// Calls `f` with the model (the part's current version) and the first `k` gradients, as
    /// the server's update does.
    ///
    /// # Panics
    /// If `k` is more than the arena's gradients.
    pub fn with<R>(&mut self, k: usize, f: impl FnOnce(&mut [f32], &[&[f32]]) -> R) -> R {
        assert!(k <= self.k, "only {} gradients", self.k);
        let ranks: Vec<u32> = (0..k as u32).collect();
        let mut out = None;
        self.arena
            .update(0, &ranks, |target, grads| {
                let dst = match target {
                    Update::InPlace(dst) => dst,
                    Update::Into { next, .. } => next,
                };
                out = Some(f(dst, grads));
            })
            .expect("nothing sends the model");
        out.expect("update calls its closure")
    }
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
