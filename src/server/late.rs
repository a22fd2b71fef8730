//! Late gradients under the barrier policies (`--late fold|drop`).
//!
//! A gradient computed on the model of round `c` that arrives while round `r > c` is open missed
//! its round by `s = r - c` rounds. With `fold` it is copied out of its slot at once (before its
//! worker gets its reply), scaled by its weight `1 / (1 + s)`, into the part's fold buffer; the
//! next round the part closes adds the buffer into its sum and counts the weights in its mean:
//! `model -= lr * (sum of on-time gradients + sum of w * late gradient) / max(on-time + sum of
//! w, 1)` (at least 1, so late gradients alone keep their down-weighting).
//! With `drop` it is discarded (and counted). Nothing is lost silently either way.

use crate::{Clock, Rank};

/// What happens to a gradient that missed its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LateMode {
    /// Add it into a later round's sum with weight `1 / (1 + rounds late)`.
    #[default]
    Fold,
    /// Discard it.
    Drop,
}

/// Late gradients waiting for their part's next close.
#[derive(Debug)]
struct Fold {
    sum: Vec<f32>,
    weight: f32,
    from: Vec<(Rank, Clock, f32)>,
}

/// Every part's fold buffer, allocated at its first late gradient.
#[derive(Debug)]
pub(crate) struct Folds {
    parts: Vec<Option<Fold>>,
}

/// The weight of a gradient computed on round `clock` that arrived while `round` was open.
pub fn weight(clock: Clock, round: Clock) -> f32 {
    1.0 / (1.0 + round.saturating_sub(clock) as f32)
}

impl Folds {
    /// No late gradient yet, for `parts` parts.
    pub fn new(parts: usize) -> Self {
        Self {
            parts: (0..parts).map(|_| None).collect(),
        }
    }

    /// Adds worker `rank`'s late gradient `grad` of part `key`, computed on round `clock` and
    /// arrived in round `round`. Returns its weight.
    pub fn add(&mut self, key: u32, grad: &[f32], rank: Rank, clock: Clock, round: Clock) -> f32 {
        let w = weight(clock, round);
        let f = self.parts[key as usize].get_or_insert_with(|| Fold {
            sum: vec![0.0; grad.len()],
            weight: 0.0,
            from: Vec::new(),
        });
        if f.from.is_empty() {
            f.sum.fill(0.0);
        }
        for (s, g) in f.sum.iter_mut().zip(grad) {
            *s += w * g;
        }
        f.weight += w;
        f.from.push((rank, clock, w));
        w
    }

    /// What the next close of part `key` adds: the weighted sum and the total weight.
    pub fn pending(&self, key: u32) -> Option<(&[f32], f32)> {
        match &self.parts[key as usize] {
            Some(f) if !f.from.is_empty() => Some((&f.sum, f.weight)),
            _ => None,
        }
    }

    /// The close of part `key` took what was pending: returns who was folded (worker, round
    /// computed on, weight) and empties the buffer (keeping its memory).
    pub fn taken(&mut self, key: u32) -> Vec<(Rank, Clock, f32)> {
        match &mut self.parts[key as usize] {
            Some(f) => {
                f.weight = 0.0;
                std::mem::take(&mut f.from)
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_gradients_are_weighted_by_how_late_they_are_and_taken_once() {
        assert_eq!(weight(3, 4), 0.5);
        assert_eq!(weight(0, 9), 0.1);
        let mut f = Folds::new(2);
        assert!(f.pending(1).is_none());
        assert_eq!(f.add(1, &[2.0, 4.0], 3, 5, 6), 0.5);
        assert_eq!(f.add(1, &[3.0, 3.0], 2, 4, 6), 1.0 / 3.0);
        let (sum, w) = f.pending(1).unwrap();
        assert_eq!(sum, &[2.0, 3.0]);
        assert!((w - 5.0 / 6.0).abs() < 1e-6);
        assert_eq!(f.taken(1), vec![(3, 5, 0.5), (2, 4, 1.0 / 3.0)]);
        assert!(f.pending(1).is_none());
        f.add(1, &[1.0, 1.0], 0, 6, 7);
        assert_eq!(
            f.pending(1).unwrap().0,
            &[0.5, 0.5],
            "the buffer starts from zero again"
        );
        assert!(f.pending(0).is_none());
    }
}
