//! The aggregation engine: sums the participants' gradients and applies the update to the model,
//! over plain slices. It imports nothing of the transports: the server hands it the arena's
//! memory.

pub mod kernels;
pub mod reference;

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
        self.step_by(kernel, model, grads, grads.len() as f32);
    }

    /// One SGD step in place with the sum of `grads` divided by `weight`:
    /// `model -= lr * sum(grads) / weight` (a weighted mean when the gradients were scaled by
    /// their weights, or one push's share of a round when `weight` is the job's workers).
    pub fn step_by(&self, kernel: Kernel, model: &mut [f32], grads: &[&[f32]], weight: f32) {
        if !grads.is_empty() {
            kernel.sum_scaled_into(model, grads, -self.lr / weight);
        }
    }

    /// One SGD step with the mean of `grads`: `next = model - lr * mean(grads)`, fused into one
    /// pass over memory. With no gradient, `next` is a copy of `model`.
    pub fn apply(&self, kernel: Kernel, next: &mut [f32], model: &[f32], grads: &[&[f32]]) {
        self.apply_by(kernel, next, model, grads, grads.len() as f32);
    }

    /// Like [`step_by`](Self::step_by), out of place: `next = model - lr * sum(grads) / weight`.
    pub fn apply_by(
        &self,
        kernel: Kernel,
        next: &mut [f32],
        model: &[f32],
        grads: &[&[f32]],
        weight: f32,
    ) {
        if grads.is_empty() {
            next.copy_from_slice(model);
            return;
        }
        kernel.sum_scaled_from(next, model, grads, -self.lr / weight);
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
        Sgd { lr: 0.5 }.step_by(Kernel::best(), &mut model, &[&[2.0; 4]], 4.0);
        assert_eq!(
            model, [-1.25; 4],
            "one push of four workers moves a quarter"
        );
        Sgd { lr: 0.5 }.apply_by(Kernel::best(), &mut next, &model, &[&[1.0; 4]], 0.5);
        assert_eq!(next, [-2.25; 4]);
    }
}
