//! The attribute record the CUDA kernel reads (`GsAttr` in `cuda_ops/ghost_shift_core.h`):
//! packing GhostShift attributes into it is a pure function, so it is tested on any machine
//! (here and, through the host build of the kernel, in `cuda_host.rs`).

use crate::ops::GhostShiftAttrs;

/// Words (u32) per ghost channel: `i32 source, i32 dy, i32 dx, f32 scale, f32 bias,
/// u32 identity, 2 x padding` (32 bytes, so one channel is two 16-byte loads).
pub(crate) const WORDS_PER_CHANNEL: usize = 8;

/// Shifts beyond this magnitude behave like any shift of H or W or more (all border); the
/// kernel's span arithmetic is 64-bit, so the clamp only keeps the value in an i32.
pub(crate) const SHIFT_LIMIT: i64 = 1 << 30;

/// Packs validated attributes into `WORDS_PER_CHANNEL * C_g` words, little-endian layout of
/// `GsAttr[C_g]`. `identity` is the CPU kernel's test (`scale == 1.0 && bias == 0.0`), under
/// which both kernels copy the source bits.
pub(crate) fn pack_attrs(attrs: &GhostShiftAttrs) -> Result<Vec<u32>, String> {
    let c_g = attrs.c_g();
    let mut words = Vec::with_capacity(WORDS_PER_CHANNEL * c_g);
    for g in 0..c_g {
        let source = attrs.sources[g];
        let source = i32::try_from(source)
            .map_err(|_| format!("GhostShift: sources[{g}] = {source} does not fit in 32 bits"))?;
        let (dy, dx) = attrs.shifts[g];
        let clamp = |v: i64| v.clamp(-SHIFT_LIMIT, SHIFT_LIMIT) as i32;
        let (scale, bias) = (attrs.scale(g), attrs.bias(g));
        let identity = scale == 1.0 && bias == 0.0;
        words.extend([
            source as u32,
            clamp(dy) as u32,
            clamp(dx) as u32,
            scale.to_bits(),
            bias.to_bits(),
            u32::from(identity),
            0,
            0,
        ]);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_one_record_per_channel() {
        let attrs = GhostShiftAttrs {
            sources: vec![3, 0, 7],
            shifts: vec![(1, -2), (i64::MAX, i64::MIN), (0, 0)],
            scales: Some(vec![1.0, 2.5, 1.0]),
            biases: Some(vec![0.0, -1.0, -0.0]),
        };
        let w = pack_attrs(&attrs).expect("pack");
        assert_eq!(w.len(), 24);
        assert_eq!(&w[..8], &[3, 1, (-2i32) as u32, 1f32.to_bits(), 0, 1, 0, 0]);
        assert_eq!(
            &w[8..16],
            &[0, (1u32 << 30), (-(1i32 << 30)) as u32, 2.5f32.to_bits(), (-1f32).to_bits(), 0, 0, 0]
        );
        // -0.0 is a zero bias for the identity test, as in the CPU kernel; its bits are kept.
        assert_eq!(&w[16..], &[7, 0, 0, 1f32.to_bits(), (-0f32).to_bits(), 1, 0, 0]);
    }

    #[test]
    fn defaults_are_identity_and_big_sources_are_errors() {
        let attrs =
            GhostShiftAttrs { sources: vec![0, 1], shifts: vec![(0, 0), (2, 2)], ..Default::default() };
        let w = pack_attrs(&attrs).expect("pack");
        assert_eq!(w[5], 1);
        assert_eq!(w[13], 1);
        let big = GhostShiftAttrs { sources: vec![1 << 31], shifts: vec![(0, 0)], ..Default::default() };
        let e = pack_attrs(&big).expect_err("source beyond i32");
        assert!(e.contains("sources[0]") && e.contains("32 bits"), "{e}");
        let nan = GhostShiftAttrs {
            sources: vec![0],
            shifts: vec![(0, 0)],
            scales: Some(vec![f32::NAN]),
            biases: None,
        };
        assert_eq!(pack_attrs(&nan).expect("pack")[5], 0, "NaN scale is not the identity");
    }
}
