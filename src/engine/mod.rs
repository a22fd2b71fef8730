//! The aggregation engine: sums the participants' gradients and applies the update to the model,
//! over plain slices. It imports nothing of the transports: the server hands it the arena's
//! memory.

pub mod kernels;

pub use kernels::Kernel;

/// The optimizer applied when a round closes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
}

impl Sgd {
    /// One SGD step in place: `model -= lr * mean(grads)`, fused into one pass over memory.
    pub fn step(&self, kernel: Kernel, model: &mut [f32], grads: &[&[f32]]) {
        if !grads.is_empty() {
            kernel.sum_scaled_into(model, grads, -self.lr / grads.len() as f32);
        }
    }

    /// One SGD step with the mean of `grads`: `next = model - lr * mean(grads)`, fused into one
    /// pass over memory. With no gradient, `next` is a copy of `model`.
    pub fn apply(&self, kernel: Kernel, next: &mut [f32], model: &[f32], grads: &[&[f32]]) {
        if grads.is_empty() {
            next.copy_from_slice(model);
            return;
        }
        let alpha = -self.lr / grads.len() as f32;
        kernel.sum_scaled_from(next, model, grads, alpha);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_applies_the_mean_of_the_gradients_given() {
        let model = [0.0f32; 4];
        let mut next = [9.0f32; 4];
        Sgd { lr: 0.5 }.apply(Kernel::best(), &mut next, &model, &[&[1.0; 4], &[3.0; 4]]);
        assert_eq!(next, [-1.0; 4]);
        Sgd { lr: 0.5 }.apply(Kernel::best(), &mut next, &[2.0; 4], &[]);
        assert_eq!(next, [2.0; 4]);
        let mut model = [0.0f32; 4];
        Sgd { lr: 0.5 }.step(Kernel::best(), &mut model, &[&[1.0; 4], &[3.0; 4]]);
        assert_eq!(model, [-1.0; 4], "in place, the same step");
    }
}
