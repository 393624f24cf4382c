//! `ai.ghostsr::GhostShift`: the declaration (the one place that names the op, its domain,
//! version, attributes and element types), its attributes with validation, and the CPU kernel.
//!
//! Semantics (see `shared/design/ghostshift-op.md`): for every ghost channel `g`,
//! `S[n,g,h,w] = X[n, sources[g], h - dy_g, w - dx_g]` where that index is in range and `0`
//! elsewhere, then `Y = scales[g] * S + biases[g]`; so border pixels read `biases[g]`.
//!
//! The kernel works plane by plane (one `(n, g)` pair at a time) and row by row: the valid span
//! of a row is one bulk copy (`copy_from_slice` when the affine map is the identity, a
//! branch-free multiply-add loop otherwise) and the border is a fill; no per-element bounds test.
//! Planes run in parallel with rayon once the tensors are large ([`PARALLEL_MIN_BYTES`]).
//! float16 is computed in f32 and rounded once (round to nearest even), like
//! `(x.astype(f32) * s + b).astype(f16)` in numpy.

use std::ffi::CStr;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Element types of a tensor, as far as this crate's ops are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// IEEE 754 binary32 (`tensor(float)`).
    F32,
    /// IEEE 754 binary16 (`tensor(float16)`).
    F16,
}

impl ElemType {
    /// The `TensorProto.DataType` value (also ONNX Runtime's `ONNXTensorElementDataType`).
    pub const fn onnx(self) -> i32 {
        match self {
            ElemType::F32 => 1,
            ElemType::F16 => 10,
        }
    }

    /// The inverse of [`ElemType::onnx`]; `None` for every other type.
    pub const fn from_onnx(v: i32) -> Option<Self> {
        match v {
            1 => Some(ElemType::F32),
            10 => Some(ElemType::F16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::F16 => 2,
        }
    }

    /// The ONNX type name (`float`, `float16`).
    pub const fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float",
            ElemType::F16 => "float16",
        }
    }
}

/// The names of an op's attributes, in the order `sources, shifts, scales, biases`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GhostShiftAttrNames {
    /// `sources` (ints, length C_g, required).
    pub sources: &'static CStr,
    /// `shifts` (ints, length 2*C_g, required).
    pub shifts: &'static CStr,
    /// `scales` (floats, length C_g, optional, default 1).
    pub scales: &'static CStr,
    /// `biases` (floats, length C_g, optional, default 0).
    pub biases: &'static CStr,
}

/// The declaration of a custom op: everything a rewriter or a runtime plugin needs to name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSpec {
    /// Op type (`NodeProto.op_type`).
    pub name: &'static CStr,
    /// Op domain (`NodeProto.domain`, and the `opset_import` entry).
    pub domain: &'static CStr,
    /// Opset version of the domain.
    pub version: i64,
    /// Attribute names.
    pub attrs: GhostShiftAttrNames,
    /// Element types the kernels accept (input and output share the type).
    pub elem_types: &'static [ElemType],
}

impl OpSpec {
    /// [`OpSpec::name`] as `&str`.
    pub fn name_str(&self) -> &'static str {
        cstr_str(self.name)
    }

    /// [`OpSpec::domain`] as `&str`.
    pub fn domain_str(&self) -> &'static str {
        cstr_str(self.domain)
    }
}

/// A `&'static CStr` literal as `&str` (all names here are ASCII).
pub fn cstr_str(c: &'static CStr) -> &'static str {
    c.to_str().unwrap_or("<non-utf8>")
}

/// The one declaration of `ai.ghostsr::GhostShift` version 1.
pub const GHOST_SHIFT: OpSpec = OpSpec {
    name: c"GhostShift",
    domain: c"ai.ghostsr",
    version: 1,
    attrs: GhostShiftAttrNames {
        sources: c"sources",
        shifts: c"shifts",
        scales: c"scales",
        biases: c"biases",
    },
    elem_types: &[ElemType::F32, ElemType::F16],
};

/// Above this many bytes (read + written) the kernel splits the planes over rayon's pool.
pub const PARALLEL_MIN_BYTES: usize = 256 * 1024;

/// The attributes of one GhostShift node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GhostShiftAttrs {
    /// For each ghost channel, the input channel it is made from.
    pub sources: Vec<i64>,
    /// For each ghost channel, `(dy, dx)`: content moves down by `dy` rows, right by `dx` columns.
    pub shifts: Vec<(i64, i64)>,
    /// Per ghost channel scale; `None` means all 1.
    pub scales: Option<Vec<f32>>,
    /// Per ghost channel bias; `None` means all 0.
    pub biases: Option<Vec<f32>>,
}

impl GhostShiftAttrs {
    /// Builds the attributes from the flat ONNX form (`shifts` as `dy0, dx0, dy1, dx1, ...`) and
    /// validates them (without knowing C_i).
    pub fn from_flat(
        sources: Vec<i64>,
        shifts: &[i64],
        scales: Option<Vec<f32>>,
        biases: Option<Vec<f32>>,
    ) -> Result<Self, String> {
        let c_g = sources.len();
        if shifts.len() != 2 * c_g {
            return Err(format!(
                "GhostShift: attribute 'shifts' has {} values, expected 2*C_g = {} (one (dy, dx) pair per entry of 'sources')",
                shifts.len(),
                2 * c_g
            ));
        }
        let shifts = shifts.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        let attrs = GhostShiftAttrs { sources, shifts, scales, biases };
        attrs.validate(None)?;
        Ok(attrs)
    }

    /// `shifts` in the flat ONNX form.
    pub fn flat_shifts(&self) -> Vec<i64> {
        self.shifts.iter().flat_map(|&(dy, dx)| [dy, dx]).collect()
    }

    /// The number of ghost channels, C_g.
    pub fn c_g(&self) -> usize {
        self.sources.len()
    }

    /// Checks lengths and source indices; `c_in` (C_i), when known, bounds the sources.
    /// Messages start with `"GhostShift: "`.
    pub fn validate(&self, c_in: Option<usize>) -> Result<(), String> {
        let c_g = self.c_g();
        if self.shifts.len() != c_g {
            return Err(format!(
                "GhostShift: attribute 'shifts' has {} values, expected 2*C_g = {} (one (dy, dx) pair per entry of 'sources')",
                2 * self.shifts.len(),
                2 * c_g
            ));
        }
        for (name, v) in [("scales", &self.scales), ("biases", &self.biases)] {
            if let Some(v) = v
                && v.len() != c_g
            {
                return Err(format!(
                    "GhostShift: attribute '{name}' has {} values, expected C_g = {c_g} (the length of 'sources')",
                    v.len()
                ));
            }
        }
        for (g, &s) in self.sources.iter().enumerate() {
            let bad = s < 0 || c_in.is_some_and(|c| s as u64 >= c as u64);
            if bad {
                let range = match c_in {
                    Some(c) => format!("[0, {c})"),
                    None => "[0, C_i)".to_string(),
                };
                return Err(format!(
                    "GhostShift: sources[{g}] = {s} is outside {range}, the channels of input X"
                ));
            }
        }
        Ok(())
    }

    /// The scale of ghost channel `g` (1 when `scales` is absent).
    pub fn scale(&self, g: usize) -> f32 {
        self.scales.as_ref().map_or(1.0, |v| v[g])
    }

    /// The bias of ghost channel `g` (0 when `biases` is absent).
    pub fn bias(&self, g: usize) -> f32 {
        self.biases.as_ref().map_or(0.0, |v| v[g])
    }

    /// Output shape for an input of shape `[N, C_i, H, W]`: `[N, C_g, H, W]`.
    pub fn output_dims(&self, input: [usize; 4]) -> [usize; 4] {
        [input[0], self.c_g(), input[2], input[3]]
    }

    /// Runs the CPU kernel: `x` has shape `dims = [N, C_i, H, W]` (row-major), `y` must hold
    /// `N * C_g * H * W` elements. Validates the attributes against C_i and the slice lengths.
    pub fn run<T: Element>(&self, x: &[T], dims: [usize; 4], y: &mut [T]) -> Result<(), String> {
        let [n, c_in, h, w] = dims;
        self.validate(Some(c_in))?;
        let c_g = self.c_g();
        let hw = h.checked_mul(w).ok_or_else(|| "GhostShift: H*W overflows".to_string())?;
        let x_len = numel(&[n, c_in, h, w])?;
        let y_len = numel(&[n, c_g, h, w])?;
        if x.len() != x_len {
            return Err(format!(
                "GhostShift: input X has {} elements, its shape {dims:?} needs {x_len}",
                x.len()
            ));
        }
        if y.len() != y_len {
            return Err(format!(
                "GhostShift: output Y has {} elements, shape {:?} needs {y_len}",
                y.len(),
                self.output_dims(dims)
            ));
        }
        if y_len == 0 {
            return Ok(());
        }
        let plane = |i: usize, dst: &mut [T], scratch: &mut Vec<f32>| {
            let (b, g) = (i / c_g, i % c_g);
            // validate() bounded the source to [0, c_in).
            let src_off = (b * c_in + self.sources[g] as usize) * hw;
            let (dy, dx) = self.shifts[g];
            shift_plane(&x[src_off..src_off + hw], dst, h, w, dy, dx, self.scale(g), self.bias(g), scratch);
        };
        // Each output plane reads one input plane: bytes moved = 2 * |Y|.
        let bytes = 2 * y_len * std::mem::size_of::<T>();
        if bytes > PARALLEL_MIN_BYTES {
            y.par_chunks_mut(hw)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (i, dst)| plane(i, dst, scratch));
        } else {
            let mut scratch = Vec::new();
            for (i, dst) in y.chunks_mut(hw).enumerate() {
                plane(i, dst, &mut scratch);
            }
        }
        Ok(())
    }
}

/// Product of dims, with overflow reported as an error.
fn numel(dims: &[usize]) -> Result<usize, String> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("GhostShift: element count of shape {dims:?} overflows"))
}

/// One `(n, g)` plane: `dst[r, c] = scale * src[r - dy, c - dx] + bias` inside, `bias` outside.
#[allow(clippy::too_many_arguments)]
fn shift_plane<T: Element>(
    src: &[T],
    dst: &mut [T],
    h: usize,
    w: usize,
    dy: i64,
    dx: i64,
    scale: f32,
    bias: f32,
    scratch: &mut Vec<f32>,
) {
    let (hi, wi) = (h as i64, w as i64);
    // A shift of H rows (or W columns) or more leaves nothing: clamping keeps the arithmetic small.
    let (dy, dx) = (dy.clamp(-hi, hi), dx.clamp(-wi, wi));
    let (r0, r1) = (dy.max(0) as usize, (hi + dy).min(hi) as usize); // valid output rows
    let (c0, c1) = (dx.max(0) as usize, (wi + dx).min(wi) as usize); // valid output columns
    let s0 = (c0 as i64 - dx) as usize; // first source column
    let border = T::from_f32(bias);
    let identity = scale == 1.0 && bias == 0.0;
    dst[..r0 * w].fill(border);
    dst[r1 * w..].fill(border);
    for r in r0..r1 {
        let sr = (r as i64 - dy) as usize;
        let srow = &src[sr * w + s0..sr * w + s0 + (c1 - c0)];
        let drow = &mut dst[r * w..(r + 1) * w];
        drow[..c0].fill(border);
        drow[c1..].fill(border);
        if identity {
            drow[c0..c1].copy_from_slice(srow);
        } else {
            T::affine(&mut drow[c0..c1], srow, scale, bias, scratch);
        }
    }
}

/// A tensor element type the CPU kernel supports.
pub trait Element: Copy + Send + Sync + 'static {
    /// The matching [`ElemType`].
    const TYPE: ElemType;
    /// Rounds an f32 to this type (round to nearest even).
    fn from_f32(v: f32) -> Self;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// `dst[i] = round(scale * f32(src[i]) + bias)` (no fused multiply-add: two f32 roundings,
    /// like numpy); `scratch` is reusable working memory.
    fn affine(dst: &mut [Self], src: &[Self], scale: f32, bias: f32, scratch: &mut Vec<f32>);
}

impl Element for f32 {
    const TYPE: ElemType = ElemType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn affine(dst: &mut [f32], src: &[f32], scale: f32, bias: f32, _scratch: &mut Vec<f32>) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = scale * s + bias;
        }
    }
}

impl Element for f16 {
    const TYPE: ElemType = ElemType::F16;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn affine(dst: &mut [f16], src: &[f16], scale: f32, bias: f32, scratch: &mut Vec<f32>) {
        scratch.clear();
        scratch.resize(src.len(), 0.0);
        // half's slice conversions use F16C when the CPU has it (runtime detection).
        src.convert_to_f32_slice(scratch);
        for v in scratch.iter_mut() {
            *v = scale * *v + bias;
        }
        dst.convert_from_f32_slice(scratch);
    }
}

/// The naive per-element definition, for tests: returns `Y` for `x` of shape `dims`.
pub fn reference<T: Element>(attrs: &GhostShiftAttrs, x: &[T], dims: [usize; 4]) -> Result<Vec<T>, String> {
    let [n, c_in, h, w] = dims;
    attrs.validate(Some(c_in))?;
    if x.len() != numel(&dims)? {
        return Err("GhostShift: input length does not match its shape".into());
    }
    let c_g = attrs.c_g();
    let mut y = Vec::with_capacity(numel(&[n, c_g, h, w])?);
    for b in 0..n {
        for g in 0..c_g {
            let (dy, dx) = attrs.shifts[g];
            for r in 0..h {
                for c in 0..w {
                    let (sr, sc) = (r as i128 - dy as i128, c as i128 - dx as i128);
                    let s = if (0..h as i128).contains(&sr) && (0..w as i128).contains(&sc) {
                        x[((b * c_in + attrs.sources[g] as usize) * h + sr as usize) * w + sc as usize]
                            .to_f32()
                    } else {
                        0.0
                    };
                    y.push(T::from_f32(attrs.scale(g) * s + attrs.bias(g)));
                }
            }
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn random_case(rng: &mut Xoshiro256PlusPlus) -> (GhostShiftAttrs, [usize; 4]) {
        let dims = [rng.gen_range(1..3), rng.gen_range(1..5), rng.gen_range(1..12), rng.gen_range(1..12)];
        let c_g = rng.gen_range(1..7);
        let sources = (0..c_g).map(|_| rng.gen_range(0..dims[1] as i64)).collect();
        let shifts = (0..c_g).map(|_| (rng.gen_range(-3..=3), rng.gen_range(-3..=3))).collect();
        let affine = rng.gen_range(0..4);
        let scales = (affine & 1 == 1).then(|| (0..c_g).map(|_| rng.gen_range(-2.0..2.0)).collect());
        let biases = (affine & 2 == 2).then(|| (0..c_g).map(|_| rng.gen_range(-1.0..1.0)).collect());
        (GhostShiftAttrs { sources, shifts, scales, biases }, dims)
    }

    fn check<T: Element + PartialEq + std::fmt::Debug>(seed: u64, conv: fn(f32) -> T) {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        for _ in 0..300 {
            let (attrs, dims) = random_case(&mut rng);
            let x: Vec<T> =
                (0..dims.iter().product::<usize>()).map(|_| conv(rng.gen_range(-4.0..4.0))).collect();
            let want = reference(&attrs, &x, dims).expect("reference");
            let mut got = vec![conv(f32::NAN); want.len()];
            attrs.run(&x, dims, &mut got).expect("run");
            let same = got.iter().zip(&want).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
            assert!(same, "mismatch for {attrs:?} {dims:?}:\n got {got:?}\nwant {want:?}");
        }
    }

    #[test]
    fn f32_matches_reference() {
        check::<f32>(1, |v| v);
    }

    #[test]
    fn f16_matches_reference() {
        check::<f16>(2, f16::from_f32);
    }

    #[test]
    fn large_parallel_matches_reference() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let dims = [2, 8, 64, 70];
        let attrs = GhostShiftAttrs {
            sources: (0..12).map(|g| g % 5).collect(),
            shifts: (0..12).map(|g| (g % 7 - 3, 3 - g % 7)).collect(),
            scales: Some((0..12).map(|g| 0.5 + g as f32 * 0.1).collect()),
            biases: None,
        };
        let x: Vec<f32> = (0..dims.iter().product::<usize>()).map(|_| rng.r#gen::<f32>()).collect();
        assert!(x.len() * 4 > PARALLEL_MIN_BYTES);
        let want = reference(&attrs, &x, dims).expect("reference");
        let mut got = vec![0.0; want.len()];
        attrs.run(&x, dims, &mut got).expect("run");
        assert_eq!(got, want);
    }

    #[test]
    fn borders_read_bias_and_big_shifts_are_all_border() {
        let attrs = GhostShiftAttrs {
            sources: vec![0, 0],
            shifts: vec![(1, -1), (i64::MAX, i64::MIN)],
            scales: Some(vec![2.0, 3.0]),
            biases: Some(vec![0.5, -1.0]),
        };
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = [0.0f32; 8];
        attrs.run(&x, [1, 1, 2, 2], &mut y).expect("run");
        assert_eq!(y, [0.5, 0.5, 4.5, 0.5, -1.0, -1.0, -1.0, -1.0]);
    }

    #[test]
    fn empty_tensors_are_fine() {
        let attrs = GhostShiftAttrs { sources: vec![0], shifts: vec![(1, 1)], ..Default::default() };
        let mut y: [f32; 0] = [];
        attrs.run(&[], [0, 1, 4, 4], &mut y).expect("N = 0");
        attrs.run(&[], [1, 1, 0, 4], &mut y).expect("H = 0");
    }

    #[test]
    fn validation_errors() {
        let msg = |r: Result<(), String>| r.expect_err("should fail");
        let ok = GhostShiftAttrs { sources: vec![0, 1], shifts: vec![(0, 1), (1, 0)], ..Default::default() };
        ok.validate(Some(2)).expect("valid");

        let e = msg(ok.validate(Some(1)));
        assert!(e.starts_with("GhostShift: ") && e.contains("sources[1] = 1"), "{e}");
        let neg = GhostShiftAttrs { sources: vec![-1], shifts: vec![(0, 0)], ..Default::default() };
        assert!(msg(neg.validate(None)).starts_with("GhostShift: sources[0] = -1"));

        let e = GhostShiftAttrs::from_flat(vec![0, 1], &[0, 1, 1], None, None).expect_err("odd shifts");
        assert!(e.starts_with("GhostShift: ") && e.contains("'shifts' has 3 values"), "{e}");
        let short = GhostShiftAttrs { shifts: vec![(0, 1)], ..ok.clone() };
        assert!(msg(short.validate(None)).contains("'shifts' has 2 values, expected 2*C_g = 4"));

        let e =
            GhostShiftAttrs::from_flat(vec![0, 1], &[0, 1, 1, 0], Some(vec![1.0]), None).expect_err("scales");
        assert!(e.starts_with("GhostShift: attribute 'scales' has 1 values"), "{e}");
        let e = GhostShiftAttrs::from_flat(vec![0], &[0, 1], None, Some(vec![1.0, 2.0])).expect_err("biases");
        assert!(e.starts_with("GhostShift: attribute 'biases' has 2 values"), "{e}");

        let mut y = [0.0f32; 3];
        let e = ok.run(&[0.0f32; 2], [1, 2, 1, 1], &mut y).expect_err("y length");
        assert!(e.starts_with("GhostShift: output Y"), "{e}");
        let from_flat =
            GhostShiftAttrs::from_flat(vec![0, 1], &ok.flat_shifts(), None, None).expect("round trip");
        assert_eq!(from_flat, ok);
    }

    #[test]
    fn elem_types_round_trip() {
        for &t in GHOST_SHIFT.elem_types {
            assert_eq!(ElemType::from_onnx(t.onnx()), Some(t));
        }
        assert_eq!(ElemType::from_onnx(6), None);
        assert_eq!(GHOST_SHIFT.name_str(), "GhostShift");
        assert_eq!(GHOST_SHIFT.domain_str(), "ai.ghostsr");
    }
}
