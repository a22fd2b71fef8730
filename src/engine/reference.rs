//! What the [`Kernel`]s are measured against (`hetsync bench aggregate` and the `aggregate`
//! criterion bench):
//! - [`scalar_loop`]: the plain loop anyone would write, one element at a time;
//! - [`fused_reference`]: the best simple memory-bound pass over the same bytes: the same sum
//!   written as a straightforward loop over `K` arrays known at compile time, which LLVM
//!   auto-vectorises for the widest SIMD this CPU has. It reads every array once and writes the
//!   accumulator once, like the kernels, so a kernel at its speed is as fast as memory allows.
//!
//! Both compute `dst[i] += alpha * (src_0[i] + ... + src_k[i])` in the kernels' order (sources
//! left to right, one multiply, one add, no FMA), so their results are bit-identical to every
//! kernel's: they differ only in how the code is written.

use super::Kernel;

/// The plain scalar loop: `dst[i] += alpha * sum_j srcs[j][i]`, one element at a time.
///
/// # Panics
/// If a source's length differs from `dst`'s.
pub fn scalar_loop(dst: &mut [f32], srcs: &[&[f32]], alpha: f32) {
    check(dst, srcs);
    let Some((first, rest)) = srcs.split_first() else {
        return;
    };
    for (i, d) in dst.iter_mut().enumerate() {
        let mut s = first[i];
        for g in rest {
            s += g[i];
        }
        *d += alpha * s;
    }
}

/// The fused reference: `dst[i] += alpha * sum_j srcs[j][i]` in one auto-vectorised pass, for
/// the widest SIMD of [`Kernel::best`]. Up to 8 sources the loop is specialised for their number;
/// beyond, it sums blocks that stay in L1 (still one read of each array, one write of `dst`).
///
/// # Panics
/// If a source's length differs from `dst`'s.
pub fn fused_reference(dst: &mut [f32], srcs: &[&[f32]], alpha: f32) {
    check(dst, srcs);
    let simd = Kernel::best();
    match srcs.len() {
        0 => {}
        1 => fused::<1>(simd, dst, srcs, alpha),
        2 => fused::<2>(simd, dst, srcs, alpha),
        3 => fused::<3>(simd, dst, srcs, alpha),
        4 => fused::<4>(simd, dst, srcs, alpha),
        5 => fused::<5>(simd, dst, srcs, alpha),
        6 => fused::<6>(simd, dst, srcs, alpha),
        7 => fused::<7>(simd, dst, srcs, alpha),
        8 => fused::<8>(simd, dst, srcs, alpha),
        _ => blocked_for(simd, dst, srcs, alpha),
    }
}

fn check(dst: &[f32], srcs: &[&[f32]]) {
    for (j, s) in srcs.iter().enumerate() {
        assert_eq!(s.len(), dst.len(), "source {j} has the wrong length");
    }
}

fn fused<const K: usize>(simd: Kernel, dst: &mut [f32], srcs: &[&[f32]], alpha: f32) {
    let n = dst.len();
    // Slices of exactly `n` elements: the loop's bounds checks fold away and it vectorises.
    let g: [&[f32]; K] = std::array::from_fn(|j| &srcs[j][..n]);
    match simd {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            // SAFETY: `Kernel::best` returned AVX-512, so this CPU supports AVX-512F.
            unsafe { x86::pass512(dst, &g, alpha) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            // SAFETY: `Kernel::best` returned AVX2, so this CPU supports AVX2.
            unsafe { x86::pass256(dst, &g, alpha) }
        }
        _ => pass(dst, &g, alpha),
    }
}

fn blocked_for(simd: Kernel, dst: &mut [f32], srcs: &[&[f32]], alpha: f32) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            // SAFETY: `Kernel::best` returned AVX-512, so this CPU supports AVX-512F.
            unsafe { x86::blocked512(dst, srcs, alpha) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            // SAFETY: `Kernel::best` returned AVX2, so this CPU supports AVX2.
            unsafe { x86::blocked256(dst, srcs, alpha) }
        }
        _ => blocked(dst, srcs, alpha),
    }
}

/// The fused loop over `K` sources of `dst.len()` elements each.
#[inline(always)]
fn pass<const K: usize>(dst: &mut [f32], g: &[&[f32]; K], alpha: f32) {
    for (i, d) in dst.iter_mut().enumerate() {
        let mut s = g[0][i];
        for x in &g[1..] {
            s += x[i];
        }
        *d += alpha * s;
    }
}

/// Any number of sources: each block of `dst` is summed in a buffer that stays in L1.
#[inline(always)]
fn blocked(dst: &mut [f32], srcs: &[&[f32]], alpha: f32) {
    const B: usize = 512;
    let mut buf = [0f32; B];
    for (c, d) in dst.chunks_mut(B).enumerate() {
        let lo = c * B;
        let t = &mut buf[..d.len()];
        t.copy_from_slice(&srcs[0][lo..lo + d.len()]);
        for s in &srcs[1..] {
            for (t, x) in t.iter_mut().zip(&s[lo..lo + d.len()]) {
                *t += x;
            }
        }
        for (d, t) in d.iter_mut().zip(t.iter()) {
            *d += alpha * t;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pass512<const K: usize>(dst: &mut [f32], g: &[&[f32]; K], alpha: f32) {
        super::pass(dst, g, alpha)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn pass256<const K: usize>(dst: &mut [f32], g: &[&[f32]; K], alpha: f32) {
        super::pass(dst, g, alpha)
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn blocked512(dst: &mut [f32], srcs: &[&[f32]], alpha: f32) {
        super::blocked(dst, srcs, alpha)
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn blocked256(dst: &mut [f32], srcs: &[&[f32]], alpha: f32) {
        super::blocked(dst, srcs, alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::tests::data;

    #[test]
    fn references_match_the_kernels_bit_for_bit() {
        for n in [0, 1, 15, 17, 63, 64, 65, 511, 513, 1000, 4099] {
            for k in [0, 1, 2, 3, 4, 5, 7, 8, 9, 16] {
                let srcs: Vec<Vec<f32>> = (0..k).map(|j| data(j as u64 + 1, n)).collect();
                let views: Vec<&[f32]> = srcs.iter().map(Vec::as_slice).collect();
                let init = data(99, n);
                let mut want = init.clone();
                Kernel::Scalar.sum_scaled_into(&mut want, &views, -0.25);
                for (name, f) in [
                    ("scalar_loop", scalar_loop as fn(&mut [f32], &[&[f32]], f32)),
                    ("fused_reference", fused_reference),
                ] {
                    let mut got = init.clone();
                    f(&mut got, &views, -0.25);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{name} differs from the scalar kernel at n={n} k={k}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "wrong length")]
    fn reference_checks_lengths() {
        fused_reference(&mut [0.0; 4], &[&[0.0; 4], &[0.0; 3]], 1.0);
    }
}
