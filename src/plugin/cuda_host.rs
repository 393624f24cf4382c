//! Tests of the CUDA kernel's logic without a GPU: `cuda_ops/ghost_shift_core.h` (the
//! `__host__ __device__` functions `ghost_shift.cu` runs on the device) is compiled for the host
//! by `build.rs` (`cuda_ops/host_shim.cpp`, which emulates the launch grid block by block and
//! thread by thread), and checked here against the CPU kernel with proptest: random shapes,
//! sources, shifts (also |shift| >= H or W), C_g > C_i, N = 2, fp32 and fp16, vector and scalar
//! column paths, small grids so the grid-stride loops wrap. Attributes go through
//! [`pack_attrs`], the packing the plugin uploads.

use std::ffi::c_void;

use half::f16;
use proptest::prelude::*;

use super::cuda_attrs::pack_attrs;
use crate::ops::{Element, GhostShiftAttrs};

unsafe extern "C" {
    fn ghostsr_host_ghost_shift_f32(
        x: *const f32,
        y: *mut f32,
        attrs: *const c_void,
        n: i64,
        c_in: i64,
        c_g: i64,
        h: i64,
        w: i64,
        force_scalar: i32,
        grid_rows: i32,
        grid_planes: i32,
        threads: i32,
    ) -> i32;
    fn ghostsr_host_ghost_shift_f16(
        x: *const c_void,
        y: *mut c_void,
        attrs: *const c_void,
        n: i64,
        c_in: i64,
        c_g: i64,
        h: i64,
        w: i64,
        force_scalar: i32,
        grid_rows: i32,
        grid_planes: i32,
        threads: i32,
    ) -> i32;
    fn ghostsr_host_float_to_half(f: f32) -> u16;
    fn ghostsr_host_half_to_float(h: u16) -> f32;
    fn ghostsr_host_vec_width(elem_bytes: i32, w: i32) -> i32;
}

/// How the emulated launch is shaped (gridDim.y, gridDim.z, blockDim.x, scalar columns).
#[derive(Debug, Clone, Copy)]
struct Grid {
    rows: i32,
    planes: i32,
    threads: i32,
    force_scalar: bool,
}

/// A tensor element with a host-kernel entry point.
trait HostElem: Element + std::fmt::Debug {
    fn bits(self) -> u32;
    fn is_nan(self) -> bool;
    /// # Safety
    /// Same contract as the C function: `x` has N*C_i*H*W elements, `y` N*C_g*H*W, `attrs`
    /// `8*C_g` words with sources in `[0, C_i)`.
    unsafe fn host(x: &[Self], y: &mut [Self], attrs: &[u32], d: [usize; 4], c_g: usize, grid: Grid) -> i32;
}

impl HostElem for f32 {
    fn bits(self) -> u32 {
        self.to_bits()
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    unsafe fn host(x: &[f32], y: &mut [f32], attrs: &[u32], d: [usize; 4], c_g: usize, g: Grid) -> i32 {
        let [n, c, h, w] = d.map(|v| v as i64);
        // SAFETY: forwarded from the caller.
        unsafe {
            ghostsr_host_ghost_shift_f32(
                x.as_ptr(),
                y.as_mut_ptr(),
                attrs.as_ptr().cast(),
                n,
                c,
                c_g as i64,
                h,
                w,
                i32::from(g.force_scalar),
                g.rows,
                g.planes,
                g.threads,
            )
        }
    }
}

impl HostElem for f16 {
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
    fn is_nan(self) -> bool {
        f16::is_nan(self)
    }
    unsafe fn host(x: &[f16], y: &mut [f16], attrs: &[u32], d: [usize; 4], c_g: usize, g: Grid) -> i32 {
        let [n, c, h, w] = d.map(|v| v as i64);
        // SAFETY: forwarded from the caller; f16 is a 2-byte plain value like the C side's half_bits.
        unsafe {
            ghostsr_host_ghost_shift_f16(
                x.as_ptr().cast(),
                y.as_mut_ptr().cast(),
                attrs.as_ptr().cast(),
                n,
                c,
                c_g as i64,
                h,
                w,
                i32::from(g.force_scalar),
                g.rows,
                g.planes,
                g.threads,
            )
        }
    }
}

/// Runs the host build of the CUDA kernel.
fn run_host<T: HostElem>(attrs: &GhostShiftAttrs, x: &[T], d: [usize; 4], grid: Grid) -> Vec<T> {
    let packed = pack_attrs(attrs).expect("pack");
    let c_g = attrs.c_g();
    let mut y = vec![T::from_f32(12345.0); d[0] * c_g * d[2] * d[3]];
    attrs.validate(Some(d[1])).expect("valid attributes");
    assert_eq!(x.len(), d.iter().product::<usize>());
    // SAFETY: lengths checked above; sources validated against C_i.
    let code = unsafe { T::host(x, &mut y, &packed, d, c_g, grid) };
    assert_eq!(code, 0);
    y
}

/// Bit equality, except that two NaNs from an affine map agree (the CUDA kernel may return the
/// canonical NaN where the CPU keeps the payload); identity entries must match bit for bit.
fn assert_same<T: HostElem>(attrs: &GhostShiftAttrs, d: [usize; 4], got: &[T], want: &[T]) {
    let hw = d[2] * d[3];
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let g = (i / hw) % attrs.c_g();
        let identity = attrs.scale(g) == 1.0 && attrs.bias(g) == 0.0;
        let same = a.bits() == b.bits() || (!identity && a.is_nan() && b.is_nan());
        assert!(same, "element {i} (channel {g}): host CUDA logic {a:?}, CPU kernel {b:?}; {attrs:?} {d:?}");
    }
}

/// Element values with the awkward cases: -0.0, NaN with a payload, infinities, subnormals.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -4.0f32..4.0,
        1 => Just(-0.0f32),
        1 => Just(f32::from_bits(0x7fc0_1234)),
        1 => Just(f32::from_bits(0xffa0_0001)),
        1 => Just(f32::INFINITY),
        1 => Just(1.0e-40f32),
        1 => Just(3.0e-6f32),
    ]
}

fn case() -> impl Strategy<Value = (GhostShiftAttrs, [usize; 4], Vec<f32>, Grid)> {
    (1usize..=2, 1usize..=4, 1usize..=9, 1usize..=9, 1usize..=25)
        .prop_flat_map(|(n, c_in, c_g, h, w)| {
            let d = [n, c_in, h, w];
            let big = (h.max(w) + 2) as i64;
            let shift = prop_oneof![
                6 => -big..=big,
                1 => Just(i64::MAX),
                1 => Just(i64::MIN),
                1 => Just(-(1i64 << 31)),
            ];
            let scale =
                prop_oneof![3 => Just(1.0f32), 2 => -2.0f32..2.0, 1 => Just(-0.0f32), 1 => Just(f32::NAN)];
            let bias = prop_oneof![3 => Just(0.0f32), 1 => Just(-0.0f32), 2 => -1.0f32..1.0];
            (
                Just(d),
                prop::collection::vec(0..c_in as i64, c_g),
                prop::collection::vec((shift.clone(), shift), c_g),
                prop::option::of(prop::collection::vec(scale, c_g)),
                prop::option::of(prop::collection::vec(bias, c_g)),
                prop::collection::vec(value(), n * c_in * h * w),
                (1i32..=3, 1i32..=3, prop_oneof![Just(1i32), Just(2), Just(3), Just(32)], any::<bool>()),
            )
        })
        .prop_map(|(d, sources, shifts, scales, biases, x, (rows, planes, threads, force_scalar))| {
            (
                GhostShiftAttrs { sources, shifts, scales, biases },
                d,
                x,
                Grid { rows, planes, threads, force_scalar },
            )
        })
}

fn check<T: HostElem>(attrs: &GhostShiftAttrs, d: [usize; 4], x: &[f32], grid: Grid) {
    let x: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let mut want = vec![T::from_f32(0.0); d[0] * attrs.c_g() * d[2] * d[3]];
    attrs.run(&x, d, &mut want).expect("CPU kernel");
    let got = run_host(attrs, &x, d, grid);
    assert_same(attrs, d, &got, &want);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn host_cuda_logic_matches_cpu_kernel_f32((attrs, d, x, grid) in case()) {
        check::<f32>(&attrs, d, &x, grid);
    }

    #[test]
    fn host_cuda_logic_matches_cpu_kernel_f16((attrs, d, x, grid) in case()) {
        check::<f16>(&attrs, d, &x, grid);
    }
}

#[test]
fn identity_copies_negative_zero_and_nan_payloads() {
    // The old kernel computed 1 * x + 0: -0.0 became +0.0 and NaN payloads were canonicalised.
    let attrs = GhostShiftAttrs { sources: vec![0], shifts: vec![(0, 1)], ..Default::default() };
    let x = [-0.0f32, f32::from_bits(0x7fc0_1234), f32::from_bits(0xff80_0001), 2.0];
    let grid = Grid { rows: 1, planes: 1, threads: 4, force_scalar: false };
    let y = run_host(&attrs, &x, [1, 1, 1, 4], grid);
    let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, [0, (-0.0f32).to_bits(), 0x7fc0_1234, 0xff80_0001]);
}

#[test]
fn half_conversions_match_the_half_crate() {
    for h in 0..=u16::MAX {
        let want = f16::from_bits(h).to_f32();
        // SAFETY: pure function.
        let got = unsafe { ghostsr_host_half_to_float(h) };
        assert!(got.to_bits() == want.to_bits(), "half {h:#06x}: {got} vs {want}");
    }
    // Every half boundary and midpoint, and a sweep of f32 bit patterns.
    let mut probes: Vec<u32> = (0..=u16::MAX)
        .flat_map(|h| {
            let f = f16::from_bits(h).to_f32().to_bits();
            [f, f.wrapping_add(1), f.wrapping_sub(1), f.wrapping_add(0x1000), f.wrapping_add(0x0fff)]
        })
        .collect();
    probes.extend((0..1u64 << 32).step_by(65_537).map(|v| v as u32));
    for bits in probes {
        let f = f32::from_bits(bits);
        // SAFETY: pure function.
        let got = unsafe { ghostsr_host_float_to_half(f) };
        let want = f16::from_f32(f);
        let same = got == want.to_bits() || (f.is_nan() && f16::from_bits(got).is_nan());
        assert!(same, "f32 {bits:#010x}: {got:#06x} vs {:#06x}", want.to_bits());
    }
}

#[test]
fn vector_width_needs_a_divisible_row() {
    // SAFETY: pure function.
    let vw = |e, w| unsafe { ghostsr_host_vec_width(e, w) };
    assert_eq!((vw(4, 1280), vw(2, 3840), vw(4, 6), vw(2, 12), vw(2, 16)), (4, 8, 1, 1, 8));
}
