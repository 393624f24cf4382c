//! Least-squares ghost fits on feature maps, and the data-chosen intrinsic set.
//!
//! For a target map `y` (a channel of the ORIGINAL network's Conv output) and a candidate source
//! `x` (a channel of the same Conv's output in the partly ghosted network) shifted by `d` with
//! zero fill (GhostShift's convention: content moves by `+d`, each calibration crop shifted on
//! its own), the best `y ≈ a * shift(x, d) + b` has a closed form from five sums (`n`, `Σx`,
//! `Σxx`, `Σy`, `Σyy`) and one cross term `Σ y·shift(x, d)`. [`PairStats`] computes every cross
//! term of a layer at once: per shift one matrix product of the centred target channels with the
//! centred, shifted source channels (f32 GEMM, no im2col), corrected back to the uncentred sums
//! in f64, shifts in parallel. The pairwise error matrix `E[g][s]` (best residual of making
//! channel `g` from channel `s` over shifts) drives [`select_intrinsic`]: greedy removal from the
//! full set, then swap passes (k-medoids style), per group with equal kept counts.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

/// Feature maps `[n, c, h, w]` (n calibration crops), row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Maps {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Maps {
    pub fn zeros(n: usize, c: usize, h: usize, w: usize) -> Self {
        Maps { n, c, h, w, data: vec![0.0; n * c * h * w] }
    }

    pub fn at(&self, n: usize, c: usize, y: usize, x: usize) -> f32 {
        self.data[((n * self.c + c) * self.h + y) * self.w + x]
    }

    /// Channel `c` of crop `n` as an `h * w` slice.
    pub fn plane(&self, n: usize, c: usize) -> &[f32] {
        let hw = self.h * self.w;
        &self.data[(n * self.c + c) * hw..(n * self.c + c + 1) * hw]
    }

    /// Number of pixels per channel over all crops.
    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// Every shift `[dy, dx]` with both components in `-m..=m`, smallest first (`[0, 0]` first),
/// so strict comparisons keep the smallest shift on ties.
pub fn shifts(m: i64) -> Vec<[i64; 2]> {
    let mut v: Vec<[i64; 2]> = (-m..=m).flat_map(|dy| (-m..=m).map(move |dx| [dy, dx])).collect();
    v.sort_by_key(|d| (d[0].abs().max(d[1].abs()), d[0].abs() + d[1].abs()));
    v
}

/// For output row `y` of a shift by `d`, the source row `y - d` if it exists.
fn src_index(i: usize, d: i64, len: usize) -> Option<usize> {
    let s = i as i64 - d;
    (0..len as i64).contains(&s).then_some(s as usize)
}

/// `shift(plane, d)` with zero fill, into `out` (same size).
fn shift_plane(plane: &[f32], h: usize, w: usize, d: [i64; 2], offset: f32, out: &mut [f32]) {
    for y in 0..h {
        let row = &mut out[y * w..(y + 1) * w];
        match src_index(y, d[0], h) {
            None => row.fill(0.0),
            Some(sy) => {
                for (x, o) in row.iter_mut().enumerate() {
                    *o = match src_index(x, d[1], w) {
                        Some(sx) => plane[sy * w + sx] - offset,
                        None => 0.0,
                    };
                }
            }
        }
    }
}

/// The least-squares fit of one target from one shifted source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fit {
    /// Sum of squared residuals.
    pub residual: f64,
    pub scale: f32,
    pub bias: f32,
}

/// All sums needed to fit any target channel from any source channel at any shift.
pub struct PairStats {
    pub shifts: Vec<[i64; 2]>,
    /// Target channels (rows) and source channels (columns).
    pub c_t: usize,
    pub c_s: usize,
    n: f64,
    /// `[d][g][s]`: `Σ (y_g - mean y_g) * shift(x_s, d)`.
    cov: Vec<f64>,
    /// `[d][s]`: `Σ shift(x_s, d)` and `Σ shift(x_s, d)^2`.
    sx: Vec<f64>,
    sxx: Vec<f64>,
    /// Per target: mean, centred sum of squares, raw sum of squares.
    mean_y: Vec<f64>,
    vy: Vec<f64>,
    syy: Vec<f64>,
    /// Target channels whose affine fits are `a x` with `a >= 0` and no bias
    /// ([`Self::scale_only`]); empty: none.
    scale_only: Vec<bool>,
}

impl PairStats {
    /// Sums for targets `y` and sources `x` (same `n, h, w`) over every shift within `max_shift`.
    pub fn compute(y: &Maps, x: &Maps, max_shift: i64) -> PairStats {
        assert_eq!((y.n, y.h, y.w), (x.n, x.h, x.w), "targets and sources must have the same size");
        let (n, h, w) = (y.n, y.h, y.w);
        let hw = h * w;
        let p = n * hw;
        let shifts = shifts(max_shift);
        let means = |m: &Maps| -> Vec<f64> {
            (0..m.c)
                .map(|c| {
                    (0..n).map(|k| m.plane(k, c).iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>()
                        / p as f64
                })
                .collect()
        };
        let mean_y = means(y);
        let mean_x = means(x);
        // Centred targets, channel-major [c_t, p].
        let mut yc = Array2::<f32>::zeros((y.c, p));
        let mut vy = vec![0.0; y.c];
        let mut syy = vec![0.0; y.c];
        for c in 0..y.c {
            let row = yc.row_mut(c).into_slice().expect("contiguous");
            for k in 0..n {
                for (o, &v) in row[k * hw..(k + 1) * hw].iter_mut().zip(y.plane(k, c)) {
                    *o = (v as f64 - mean_y[c]) as f32;
                    vy[c] += (v as f64 - mean_y[c]).powi(2);
                    syy[c] += (v as f64).powi(2);
                }
            }
        }
        let per_shift: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = shifts
            .par_iter()
            .map(|&d| {
                // Centred, shifted sources [c_s, p]: shift(x - mean) with zero fill.
                let mut xs = Array2::<f32>::zeros((x.c, p));
                let mut sx = vec![0.0; x.c];
                let mut sxx = vec![0.0; x.c];
                let mut raw = vec![0.0f32; hw];
                for c in 0..x.c {
                    let row = xs.row_mut(c).into_slice().expect("contiguous");
                    for k in 0..n {
                        shift_plane(x.plane(k, c), h, w, d, mean_x[c] as f32, &mut row[k * hw..(k + 1) * hw]);
                        shift_plane(x.plane(k, c), h, w, d, 0.0, &mut raw);
                        for &v in &raw {
                            sx[c] += v as f64;
                            sxx[c] += (v as f64) * (v as f64);
                        }
                    }
                }
                // Σ y' shift(x) = Σ y' shift(x') + mean_x * Σ_{valid(d)} y'.
                let m = yc.dot(&xs.t());
                let valid_sum = valid_sums(yc.view(), n, h, w, d);
                let mut cov = vec![0.0; y.c * x.c];
                for g in 0..y.c {
                    for s in 0..x.c {
                        cov[g * x.c + s] = m[[g, s]] as f64 + mean_x[s] * valid_sum[g];
                    }
                }
                (cov, sx, sxx)
            })
            .collect();
        let mut cov = Vec::with_capacity(shifts.len() * y.c * x.c);
        let mut sx = Vec::with_capacity(shifts.len() * x.c);
        let mut sxx = Vec::with_capacity(shifts.len() * x.c);
        for (c, a, b) in per_shift {
            cov.extend(c);
            sx.extend(a);
            sxx.extend(b);
        }
        PairStats {
            shifts,
            c_t: y.c,
            c_s: x.c,
            n: p as f64,
            cov,
            sx,
            sxx,
            mean_y,
            vy,
            syy,
            scale_only: vec![],
        }
    }

    /// From now on, affine fits of the targets marked in `mask` are a non-negative scale
    /// without bias (`y ≈ a x`, `a >= 0`): the ghosts that [`crate::emit::fold`] can absorb into
    /// the Convs reading them, through Relu and LeakyRelu (which commute only with such a scale).
    pub fn scale_only(mut self, mask: Vec<bool>) -> Self {
        self.scale_only = mask;
        self
    }

    /// The best `a, b` (or `a = 1, b = 0` without `affine`; `b = 0, a >= 0` with
    /// [`Self::scale_only`]) for target `g`, source `s`, shift index `di` (into [`Self::shifts`]).
    pub fn fit(&self, g: usize, s: usize, di: usize, affine: bool) -> Fit {
        let cov = self.cov[(di * self.c_t + g) * self.c_s + s];
        let sx = self.sx[di * self.c_s + s];
        let sxx = self.sxx[di * self.c_s + s];
        if affine && self.scale_only.get(g).copied().unwrap_or(false) {
            // min_a Σ (y - a x)^2 over a >= 0: a = max(0, Σxy / Σx²).
            let sxy = cov + self.mean_y[g] * sx;
            let a = if sxx > 1e-30 { (sxy / sxx).max(0.0) } else { 0.0 };
            return Fit {
                residual: (self.syy[g] - 2.0 * a * sxy + a * a * sxx).max(0.0),
                scale: a as f32,
                bias: 0.0,
            };
        }
        if affine {
            let varx = sxx - sx * sx / self.n;
            if varx <= 1e-12 * sxx.max(1e-30) {
                return Fit { residual: self.vy[g], scale: 0.0, bias: self.mean_y[g] as f32 };
            }
            let a = cov / varx;
            let b = self.mean_y[g] - a * sx / self.n;
            Fit { residual: (self.vy[g] - cov * a).max(0.0), scale: a as f32, bias: b as f32 }
        } else {
            let sxy = cov + self.mean_y[g] * sx;
            Fit { residual: (self.syy[g] - 2.0 * sxy + sxx).max(0.0), scale: 1.0, bias: 0.0 }
        }
    }

    /// The best source among `sources` and shift for target `g`: `(source, shift index, fit)`.
    pub fn best(&self, g: usize, sources: &[usize], affine: bool) -> (usize, usize, Fit) {
        let mut best: Option<(usize, usize, Fit)> = None;
        for di in 0..self.shifts.len() {
            for &s in sources {
                let f = self.fit(g, s, di, affine);
                if best.is_none_or(|(_, _, b)| f.residual < b.residual) {
                    best = Some((s, di, f));
                }
            }
        }
        best.expect("at least one source")
    }

    /// Error of keeping channel `c` as it is (`Σ (y_c - x_c)^2`, unshifted, no affine).
    pub fn keep_error(&self, c: usize) -> f64 {
        let d0 = self.shifts.iter().position(|d| *d == [0, 0]).expect("[0, 0] is always a shift");
        self.fit(c, c, d0, false).residual
    }

    /// `E[g][s]`: the best residual of making target `g` from source `s` over all shifts, with
    /// `E[c][c]` the error of keeping `c` ([`Self::keep_error`]). Needs `c_t == c_s`.
    pub fn error_matrix(&self, affine: bool) -> Vec<Vec<f64>> {
        (0..self.c_t)
            .into_par_iter()
            .map(|g| {
                (0..self.c_s)
                    .map(|s| {
                        if s == g {
                            self.keep_error(g)
                        } else {
                            (0..self.shifts.len())
                                .map(|di| self.fit(g, s, di, affine).residual)
                                .fold(f64::INFINITY, f64::min)
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// `[g]`: `Σ` of the (centred) target rows over the pixels that a shift by `d` fills from the
/// source (the rest are zero fill).
fn valid_sums(yc: ArrayView2<'_, f32>, n: usize, h: usize, w: usize, d: [i64; 2]) -> Vec<f64> {
    let hw = h * w;
    let rows: Vec<usize> = (0..h).filter(|&y| src_index(y, d[0], h).is_some()).collect();
    let cols: Vec<usize> = (0..w).filter(|&x| src_index(x, d[1], w).is_some()).collect();
    yc.rows()
        .into_iter()
        .map(|r| {
            let r = r.as_slice().expect("contiguous");
            let mut s = 0.0f64;
            for k in 0..n {
                for &y in &rows {
                    let base = k * hw + y * w;
                    for &x in &cols {
                        s += r[base + x] as f64;
                    }
                }
            }
            s
        })
        .collect()
}

/// Cost of intrinsic set `kept` (a mask over `channels`) under the error matrix: kept channels
/// pay their keep error, the others their best kept source's error.
fn set_cost(e: &[Vec<f64>], channels: &[usize], kept: &[bool]) -> f64 {
    let mut total = 0.0;
    for (i, &c) in channels.iter().enumerate() {
        if kept[i] {
            total += e[c][c];
        } else {
            let best = channels
                .iter()
                .enumerate()
                .filter(|&(j, _)| kept[j])
                .map(|(_, &s)| e[c][s])
                .fold(f64::INFINITY, f64::min);
            total += best;
        }
    }
    total
}

/// The data-chosen intrinsic set: per group of `c_out / group` channels, `keep` channels
/// minimising [`set_cost`], by greedy removal from the full set and then first-improvement swap
/// passes (at most `max_passes`). Returns ascending channel indices.
pub fn select_intrinsic(e: &[Vec<f64>], group: usize, keep: usize, max_passes: usize) -> Vec<usize> {
    let c_out = e.len();
    let per = c_out / group;
    let keep = keep.clamp(1, per);
    let mut out = Vec::new();
    for gi in 0..group {
        let channels: Vec<usize> = (gi * per..(gi + 1) * per).collect();
        let mut kept = vec![true; per];
        let mut count = per;
        while count > keep {
            let mut best: Option<(f64, usize)> = None;
            for r in 0..per {
                if !kept[r] {
                    continue;
                }
                kept[r] = false;
                let c = set_cost(e, &channels, &kept);
                kept[r] = true;
                if best.is_none_or(|(b, _)| c < b) {
                    best = Some((c, r));
                }
            }
            let (_, r) = best.expect("a kept channel");
            kept[r] = false;
            count -= 1;
        }
        let mut cur = set_cost(e, &channels, &kept);
        for _ in 0..max_passes {
            let mut improved = false;
            'swap: for i in 0..per {
                if !kept[i] {
                    continue;
                }
                for o in 0..per {
                    if kept[o] {
                        continue;
                    }
                    kept[i] = false;
                    kept[o] = true;
                    let c = set_cost(e, &channels, &kept);
                    if c < cur - 1e-9 * cur.abs() {
                        cur = c;
                        improved = true;
                        break 'swap;
                    }
                    kept[i] = true;
                    kept[o] = false;
                }
            }
            if !improved {
                break;
            }
        }
        out.extend(channels.iter().enumerate().filter(|&(i, _)| kept[i]).map(|(_, &c)| c));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256Plus;

    fn random_maps(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Maps {
        let mut rng = Xoshiro256Plus::seed_from_u64(seed);
        let mut m = Maps::zeros(n, c, h, w);
        for v in m.data.iter_mut() {
            *v = rng.gen_range(-1.0..1.0) + 0.7;
        }
        m
    }

    /// `maps[dst] = a * shift(maps[src], d) + b` in every crop.
    fn plant(m: &mut Maps, src: usize, dst: usize, d: [i64; 2], a: f32, b: f32) {
        let from = m.clone();
        plant_from(&from, m, src, dst, d, a, b);
    }

    /// `to[dst] = a * shift(from[src], d) + b` in every crop.
    fn plant_from(from: &Maps, m: &mut Maps, src: usize, dst: usize, d: [i64; 2], a: f32, b: f32) {
        let hw = m.h * m.w;
        let mut buf = vec![0.0; hw];
        for k in 0..m.n {
            shift_plane(from.plane(k, src), m.h, m.w, d, 0.0, &mut buf);
            let base = (k * m.c + dst) * hw;
            for (o, &v) in m.data[base..base + hw].iter_mut().zip(&buf) {
                *o = a * v + b;
            }
        }
    }

    #[test]
    fn shift_moves_content_by_plus_d_with_zero_fill() {
        let plane: Vec<f32> = (0..9).map(|v| v as f32 + 1.0).collect();
        let mut out = vec![0.0; 9];
        shift_plane(&plane, 3, 3, [1, -1], 0.0, &mut out);
        // out[y][x] = plane[y-1][x+1]
        assert_eq!(out, vec![0.0, 0.0, 0.0, 2.0, 3.0, 0.0, 5.0, 6.0, 0.0]);
    }

    #[test]
    fn stats_match_direct_sums() {
        let y = random_maps(2, 3, 5, 6, 1);
        let x = random_maps(2, 4, 5, 6, 2);
        let st = PairStats::compute(&y, &x, 1);
        let mut buf = vec![0.0; 30];
        for (di, &d) in st.shifts.iter().enumerate() {
            for g in 0..3 {
                for s in 0..4 {
                    // Direct least squares over all pixels.
                    let (mut xs, mut ys) = (vec![], vec![]);
                    for k in 0..2 {
                        shift_plane(x.plane(k, s), 5, 6, d, 0.0, &mut buf);
                        xs.extend(buf.iter().map(|&v| v as f64));
                        ys.extend(y.plane(k, g).iter().map(|&v| v as f64));
                    }
                    let n = xs.len() as f64;
                    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
                    let cov: f64 = xs.iter().zip(&ys).map(|(a, b)| (a - mx) * (b - my)).sum();
                    let vx: f64 = xs.iter().map(|a| (a - mx).powi(2)).sum();
                    let a = cov / vx;
                    let b = my - a * mx;
                    let res: f64 = xs.iter().zip(&ys).map(|(x, y)| (y - a * x - b).powi(2)).sum();
                    let f = st.fit(g, s, di, true);
                    assert!(
                        (f.residual - res).abs() < 1e-3 * res.max(1.0),
                        "{d:?} {g} {s}: {} vs {res}",
                        f.residual
                    );
                    assert!((f.scale as f64 - a).abs() < 1e-4 && (f.bias as f64 - b).abs() < 1e-4);
                    let plain: f64 = xs.iter().zip(&ys).map(|(x, y)| (y - x).powi(2)).sum();
                    let f = st.fit(g, s, di, false);
                    assert!((f.residual - plain).abs() < 1e-3 * plain.max(1.0));
                    assert_eq!((f.scale, f.bias), (1.0, 0.0));
                }
            }
        }
    }

    #[test]
    fn scale_only_fits_are_bias_free_and_never_negative() {
        let x = random_maps(2, 3, 6, 7, 5);
        let mut y = random_maps(2, 3, 6, 7, 6);
        plant_from(&x, &mut y, 0, 0, [0, 0], 0.6, 0.0);
        plant_from(&x, &mut y, 1, 1, [0, 0], -0.8, 0.0);
        plant_from(&x, &mut y, 2, 2, [0, 0], 1.5, 0.4);
        let st = PairStats::compute(&y, &x, 0).scale_only(vec![true; 3]);
        // An exact positive multiple is recovered with no residual.
        let f = st.fit(0, 0, 0, true);
        assert!((f.scale - 0.6).abs() < 1e-5 && f.bias == 0.0 && f.residual < 1e-4, "{f:?}");
        // A negative multiple (random maps are positive) clamps to 0: residual = Σ y².
        let f = st.fit(1, 1, 0, true);
        let syy: f64 = (0..2).flat_map(|k| y.plane(k, 1).iter().map(|&v| (v as f64).powi(2))).sum();
        assert_eq!((f.scale, f.bias), (0.0, 0.0));
        assert!((f.residual - syy).abs() < 1e-6 * syy);
        // With a bias in the data the fit has none, and does worse than the affine fit.
        let f = st.fit(2, 2, 0, true);
        assert_eq!(f.bias, 0.0);
        assert!(f.scale > 0.0 && f.residual > 1e-3);
        assert!(PairStats::compute(&y, &x, 0).fit(2, 2, 0, true).residual < 1e-4);
        // Without affine terms the setting changes nothing.
        assert_eq!(st.fit(2, 2, 0, false), PairStats::compute(&y, &x, 0).fit(2, 2, 0, false));
    }

    #[test]
    fn a_shifted_scaled_copy_is_recovered_exactly() {
        let x = random_maps(3, 6, 12, 10, 3);
        let mut y = random_maps(3, 6, 12, 10, 4);
        plant_from(&x, &mut y, 4, 1, [1, -1], -0.75, 0.3);
        plant_from(&x, &mut y, 2, 5, [0, 1], 1.0, 0.0);
        let st = PairStats::compute(&y, &x, 1);
        let (s, di, f) = st.best(1, &[0, 2, 3, 4], true);
        assert_eq!((s, st.shifts[di]), (4, [1, -1]));
        assert!(f.residual < 1e-6 * st.vy[1], "residual {}", f.residual);
        assert!((f.scale + 0.75).abs() < 1e-4 && (f.bias - 0.3).abs() < 1e-4, "{f:?}");
        // Without affine terms the exact (unit) copy is still found, with zero residual.
        let (s, di, f) = st.best(5, &[0, 2, 3, 4], false);
        assert_eq!((s, st.shifts[di]), (2, [0, 1]));
        assert!(f.residual < 1e-6 * st.syy[5], "residual {}", f.residual);
    }

    #[test]
    fn intrinsic_selection_finds_the_planted_sources() {
        // 8 channels: 0..4 random, 4..8 shifted/scaled copies of 3, 0, 2, 1. Keep 4.
        let mut m = random_maps(2, 8, 10, 10, 5);
        plant(&mut m, 3, 4, [1, 0], 0.5, 0.1);
        plant(&mut m, 0, 5, [0, 0], 2.0, 0.0);
        plant(&mut m, 2, 6, [-1, 1], 1.0, -0.2);
        plant(&mut m, 1, 7, [0, -1], -1.0, 0.0);
        // The network's own output: the target itself (layer 0), keep error 0 everywhere.
        let st = PairStats::compute(&m, &m, 1);
        let e = st.error_matrix(true);
        let kept = select_intrinsic(&e, 1, 4, 10);
        // Either member of a planted pair can be the source of the other except where zero
        // fill breaks symmetry; the four kept must cover the four pairs.
        let pairs = [(3, 4), (0, 5), (2, 6), (1, 7)];
        for (a, b) in pairs {
            assert!(kept.contains(&a) ^ kept.contains(&b), "pair ({a},{b}) not covered once: {kept:?}");
        }
        // Grouped: 2 groups of 4, planted pairs inside each group, 2 kept per group.
        let mut m = random_maps(2, 8, 10, 10, 6);
        plant(&mut m, 0, 2, [0, 1], 0.5, 0.0);
        plant(&mut m, 1, 3, [1, 1], 1.5, 0.0);
        plant(&mut m, 5, 4, [0, 0], -1.0, 0.0);
        plant(&mut m, 6, 7, [-1, 0], 1.0, 0.5);
        let st = PairStats::compute(&m, &m, 1);
        let kept = select_intrinsic(&st.error_matrix(true), 2, 2, 10);
        assert_eq!(kept.len(), 4);
        assert_eq!(kept.iter().filter(|&&c| c < 4).count(), 2);
        for (a, b) in [(0, 2), (1, 3), (5, 4), (6, 7)] {
            assert!(kept.contains(&a) ^ kept.contains(&b), "pair ({a},{b}): {kept:?}");
        }
    }
}
