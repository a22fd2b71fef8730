//! Inputs shared by Het-Sync's criterion benches: deterministic gradient data laid out the way the
//! server's arena lays it out.

#![deny(missing_docs)]

use hetsync::protocol::HEADER_LEN;

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
