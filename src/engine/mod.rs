//! The aggregation engine: sums the participants' gradient slots and applies the update to the
//! model, in place in the transport's mmapped region.

pub mod kernels;

pub use kernels::Kernel;

use hetsync_transport::SlotRegion;

use crate::Rank;

/// The optimizer applied when a round closes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
}

impl Sgd {
    /// Applies one SGD step with the mean of the participants' gradients:
    /// `model -= lr * mean(grad_p for p in participants)`, fused into one pass over memory.
    pub fn apply(&self, kernel: Kernel, region: &mut SlotRegion, key: u32, participants: &[Rank]) {
        if participants.is_empty() {
            return;
        }
        let (model, slots) = region.model_and_slots(key as usize);
        let grads: Vec<&[f32]> = participants
            .iter()
            .map(|&p| slots.get(p as usize))
            .collect();
        let alpha = -self.lr / participants.len() as f32;
        kernel.sum_scaled_into(model, &grads, alpha);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetsync_transport::RegionLayout;

    #[test]
    fn sgd_applies_the_mean_of_the_participants_only() {
        let mut r = SlotRegion::new(RegionLayout::new(3, &[4]).unwrap()).unwrap();
        for (w, v) in [(0usize, 1.0f32), (1, 3.0), (2, 100.0)] {
            r.slot_bytes_mut(w, 0)
                .copy_from_slice(bytemuck::cast_slice(&[v; 4]));
        }
        Sgd { lr: 0.5 }.apply(Kernel::best(), &mut r, 0, &[0, 1]);
        assert_eq!(r.model(0), &[-1.0; 4]);
        Sgd { lr: 0.5 }.apply(Kernel::best(), &mut r, 0, &[]);
        assert_eq!(r.model(0), &[-1.0; 4]);
    }
}
