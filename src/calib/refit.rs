//! Ridge refit of a ghosted Conv's kept filters.
//!
//! With the ghost map fixed (`ghost_g = a_g * shift(z_s, d_g) + b_g`, `z_s` the reduced Conv's
//! output for kept filter `s`), filter `s` (weights and bias, `ŵ`) appears in its own output and
//! in each of its ghosts. Substituting `q = p - d_g`, the ghost terms read the same input patch
//! `Â(q)` as the kept output, so on interior pixels (margin = the largest shift, so `q + d_g`
//! stays inside the crop) the least-squares objective
//! `Σ_q (y_s(q) - ŵ·Â(q))² + Σ_g (y_g(q + d_g) - b_g - a_g ŵ·Â(q))² + reg·α_s |ŵ - ŵ₀|²`
//! has the normal equations `(Ĝ + reg I) ŵ = Âᵀ t_s / α_s + reg ŵ₀` with `Ĝ = ÂᵀÂ`,
//! `α_s = 1 + Σ_g a_g²` and `t_s = y_s + Σ_g a_g (y_g(· + d_g) - b_g)`. The ridge is relative
//! (`reg = ridge * mean diag Ĝ`) and pulls toward the pretrained filter. One Gram matrix and one
//! Cholesky factorisation per group serve every kept filter of the group; the patches are a
//! deterministic subsample of the interior pixels (no dense im2col of every pixel), the Gram
//! product runs on threads over row blocks.

use anyhow::{Result, bail};
use ndarray::Array2;
use rayon::prelude::*;

use super::fit::Maps;
use crate::plan::Ghost;

/// The geometry of a stride-1, dilation-1 Conv.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub c_in: usize,
    pub c_out: usize,
    pub group: usize,
    pub kernel: [usize; 2],
    /// Top and left zero padding.
    pub pad: [usize; 2],
}

/// The normal equations of one group for one use of a Conv: `Ĝ`, `Âᵀ t_s` for each kept
/// filter, `α_s`.
#[derive(Clone, Debug)]
pub struct GroupEquations {
    pub kept: Vec<usize>,
    pub gram: Array2<f64>,
    /// `[d, kept]`.
    pub rhs: Array2<f64>,
    pub alpha: Vec<f64>,
}

/// Refits the kept filters (`intrinsic`) of a Conv with weights `w` (`[c_out, c_in/group, kh,
/// kw]`) and optional bias from its input `x` and the original network's output `y`, given the
/// ghost map. Returns the new weights and bias (ghost filters unchanged, they are unused).
#[allow(clippy::too_many_arguments)]
pub fn refit(
    x: &Maps,
    y: &Maps,
    w: &[f32],
    b: Option<&[f32]>,
    geom: ConvGeom,
    intrinsic: &[usize],
    ghosts: &[Ghost],
    ridge: f64,
    samples: usize,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let eq = equations(x, y, geom, b.is_some(), intrinsic, ghosts, samples)?;
    solve(w, b, geom, &[eq], ridge)
}

/// The normal equations of every group for one use (see the module docs).
pub fn equations(
    x: &Maps,
    y: &Maps,
    geom: ConvGeom,
    has_bias: bool,
    intrinsic: &[usize],
    ghosts: &[Ghost],
    samples: usize,
) -> Result<Vec<GroupEquations>> {
    let ConvGeom { c_in, c_out, group, kernel: [kh, kw], pad: [pt, pl] } = geom;
    let cig = c_in / group;
    let per = c_out / group;
    let dw = cig * kh * kw;
    if x.c != c_in || y.c != c_out || x.n != y.n {
        bail!("refit: shapes do not match (input {} ch, output {} ch)", x.c, y.c);
    }
    let d = dw + usize::from(has_bias);
    let m = ghosts.iter().flat_map(|g| g.shift).map(|v| v.unsigned_abs() as usize).max().unwrap_or(0);
    if y.h <= 2 * m || y.w <= 2 * m {
        bail!("refit: the crops are too small for shifts of {m}");
    }
    // Interior output positions, subsampled with a fixed stride.
    let total = y.n * (y.h - 2 * m) * (y.w - 2 * m);
    let step = total.div_ceil(samples.max(1)).max(1);
    let positions: Vec<(usize, usize, usize)> = (0..y.n)
        .flat_map(|k| (m..y.h - m).flat_map(move |r| (m..y.w - m).map(move |c| (k, r, c))))
        .step_by(step)
        .collect();
    let s_len = positions.len();

    let mut out = Vec::new();
    for gi in 0..group {
        let kept: Vec<usize> = intrinsic.iter().copied().filter(|&c| c / per == gi).collect();
        if kept.is_empty() {
            continue;
        }
        // Patches Â [s_len, d].
        let mut a = Array2::<f32>::zeros((s_len, d));
        a.axis_iter_mut(ndarray::Axis(0)).into_par_iter().zip(positions.par_iter()).for_each(
            |(mut row, &(k, r, c))| {
                let row = row.as_slice_mut().expect("contiguous");
                for ci in 0..cig {
                    let plane = x.plane(k, gi * cig + ci);
                    for i in 0..kh {
                        let yy = r as i64 - pt as i64 + i as i64;
                        for j in 0..kw {
                            let xx = c as i64 - pl as i64 + j as i64;
                            if (0..x.h as i64).contains(&yy) && (0..x.w as i64).contains(&xx) {
                                row[(ci * kh + i) * kw + j] = plane[yy as usize * x.w + xx as usize];
                            }
                        }
                    }
                }
                if has_bias {
                    row[dw] = 1.0;
                }
            },
        );
        // Targets t_s [s_len, kept] and α_s.
        let mut t = Array2::<f32>::zeros((s_len, kept.len()));
        let mut alpha = vec![1.0f64; kept.len()];
        for (j, &s) in kept.iter().enumerate() {
            for (q, &(k, r, c)) in positions.iter().enumerate() {
                t[[q, j]] = y.at(k, s, r, c);
            }
            for g in ghosts.iter().filter(|g| g.source == s) {
                let (sc, bi) = (g.scale(), g.bias());
                alpha[j] += (sc as f64).powi(2);
                for (q, &(k, r, c)) in positions.iter().enumerate() {
                    let rr = (r as i64 + g.shift[0]) as usize;
                    let cc = (c as i64 + g.shift[1]) as usize;
                    t[[q, j]] += sc * (y.at(k, g.channel, rr, cc) - bi);
                }
            }
        }
        let gram = par_gram(&a);
        let rhs = a.t().dot(&t).mapv(|v| v as f64);
        out.push(GroupEquations { kept, gram, rhs, alpha });
    }
    Ok(out)
}

/// Solves the refit from the equations of one or more uses of the same weights (a shared
/// Conv): filter `s` minimises `Σ_uses` of its objective plus `reg·Σα_s |ŵ - ŵ₀|²`, i.e.
/// `(Σ α_s Ĝ + reg Σα_s I) ŵ = Σ Âᵀ t_s + reg Σα_s ŵ₀`, `reg = ridge * mean diag ΣĜ / uses`.
/// With one use every filter of a group shares one factorisation.
pub fn solve(
    w: &[f32],
    b: Option<&[f32]>,
    geom: ConvGeom,
    uses: &[Vec<GroupEquations>],
    ridge: f64,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let ConvGeom { c_in, c_out, group, kernel: [kh, kw], .. } = geom;
    let dw = c_in / group * kh * kw;
    if w.len() != c_out * dw {
        bail!("refit: {} weights for a Conv of {c_out} x {dw}", w.len());
    }
    let mut w_new = w.to_vec();
    let mut b_new = b.map(<[f32]>::to_vec);
    let Some(first) = uses.first() else { return Ok((w_new, b_new)) };
    for (gi, eq0) in first.iter().enumerate() {
        let d = eq0.gram.nrows();
        let eqs: Vec<&GroupEquations> = uses.iter().filter_map(|u| u.get(gi)).collect();
        if eqs.iter().any(|e| e.kept != eq0.kept || e.gram.nrows() != d) {
            bail!("refit: the uses of a shared Conv keep different filters");
        }
        let mean_diag = eqs.iter().map(|e| (0..d).map(|i| e.gram[[i, i]]).sum::<f64>()).sum::<f64>()
            / (d * eqs.len()) as f64;
        let reg = ridge * mean_diag.max(1e-12);
        let w0 =
            |s: usize, i: usize| if i < dw { w[s * dw + i] as f64 } else { b.map_or(0.0, |b| b[s] as f64) };
        let mut store = |s: usize, v: &[f64]| {
            for i in 0..dw {
                w_new[s * dw + i] = v[i] as f32;
            }
            if let Some(bn) = b_new.as_mut() {
                bn[s] = v[dw] as f32;
            }
        };
        if eqs.len() == 1 {
            let mut mat = eq0.gram.clone();
            for i in 0..d {
                mat[[i, i]] += reg;
            }
            let chol = cholesky(&mat)?;
            for (j, &s) in eq0.kept.iter().enumerate() {
                let mut v: Vec<f64> =
                    (0..d).map(|i| eq0.rhs[[i, j]] / eq0.alpha[j] + reg * w0(s, i)).collect();
                cholesky_solve(&chol, &mut v);
                store(s, &v);
            }
        } else {
            for (j, &s) in eq0.kept.iter().enumerate() {
                let a_sum: f64 = eqs.iter().map(|e| e.alpha[j]).sum();
                let mut mat = Array2::<f64>::zeros((d, d));
                for e in &eqs {
                    mat.scaled_add(e.alpha[j], &e.gram);
                }
                for i in 0..d {
                    mat[[i, i]] += reg * a_sum;
                }
                let mut v: Vec<f64> = (0..d)
                    .map(|i| eqs.iter().map(|e| e.rhs[[i, j]]).sum::<f64>() + reg * a_sum * w0(s, i))
                    .collect();
                cholesky_solve(&cholesky(&mat)?, &mut v);
                store(s, &v);
            }
        }
    }
    Ok((w_new, b_new))
}

/// `AᵀA` in f64, row blocks on threads.
fn par_gram(a: &Array2<f32>) -> Array2<f64> {
    let d = a.ncols();
    let blocks = rayon::current_num_threads().max(1);
    let chunk = a.nrows().div_ceil(blocks).max(1);
    a.axis_chunks_iter(ndarray::Axis(0), chunk)
        .into_par_iter()
        .map(|blk| blk.t().dot(&blk).mapv(|v| v as f64))
        .reduce(|| Array2::<f64>::zeros((d, d)), |x, y| x + y)
}

/// Lower Cholesky factor of a symmetric positive definite matrix.
fn cholesky(m: &Array2<f64>) -> Result<Array2<f64>> {
    let n = m.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for i in 0..n {
        for j in 0..=i {
            let mut s = m[[i, j]];
            for k in 0..j {
                s -= l[[i, k]] * l[[j, k]];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    bail!("refit: the Gram matrix is not positive definite");
                }
                l[[i, i]] = s.sqrt();
            } else {
                l[[i, j]] = s / l[[j, j]];
            }
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ v = b` in place.
fn cholesky_solve(l: &Array2<f64>, v: &mut [f64]) {
    let n = v.len();
    for i in 0..n {
        let mut s = v[i];
        for k in 0..i {
            s -= l[[i, k]] * v[k];
        }
        v[i] = s / l[[i, i]];
    }
    for i in (0..n).rev() {
        let mut s = v[i];
        for k in i + 1..n {
            s -= l[[k, i]] * v[k];
        }
        v[i] = s / l[[i, i]];
    }
}

/// A direct stride-1 convolution (for tests and small checks).
pub fn conv2d(x: &Maps, w: &[f32], b: Option<&[f32]>, geom: ConvGeom) -> Maps {
    let ConvGeom { c_in, c_out, group, kernel: [kh, kw], pad: [pt, pl] } = geom;
    let (cig, per) = (c_in / group, c_out / group);
    let mut out = Maps::zeros(x.n, c_out, x.h, x.w);
    for k in 0..x.n {
        for o in 0..c_out {
            let gi = o / per;
            for r in 0..x.h {
                for c in 0..x.w {
                    let mut s = b.map_or(0.0, |b| b[o]);
                    for ci in 0..cig {
                        for i in 0..kh {
                            for j in 0..kw {
                                let yy = r as i64 - pt as i64 + i as i64;
                                let xx = c as i64 - pl as i64 + j as i64;
                                if (0..x.h as i64).contains(&yy) && (0..x.w as i64).contains(&xx) {
                                    s += w[((o * cig + ci) * kh + i) * kw + j]
                                        * x.at(k, gi * cig + ci, yy as usize, xx as usize);
                                }
                            }
                        }
                    }
                    out.data[((k * c_out + o) * x.h + r) * x.w + c] = s;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256Plus;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256Plus::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    #[test]
    fn refit_recovers_known_weights_through_the_ghost_map() {
        // Target: a Conv with weights w_true. Start from perturbed weights; ghosts are exact
        // shifted, scaled copies of kept outputs (inside the crop), so the refit must return
        // w_true for the kept filters.
        let geom = ConvGeom { c_in: 4, c_out: 6, group: 2, kernel: [3, 3], pad: [1, 1] };
        let x = Maps { n: 2, c: 4, h: 12, w: 12, data: random(2 * 4 * 144, 1) };
        let w_true = random(6 * 2 * 9, 2);
        let b_true = random(6, 3);
        let mut y = conv2d(&x, &w_true, Some(&b_true), geom);
        // Channels 1 (group 0) and 4 (group 1) are ghosts of 0 and 5.
        let ghosts = vec![
            Ghost { channel: 1, source: 0, shift: [1, 0], scale: Some(0.5), bias: Some(0.2) },
            Ghost { channel: 4, source: 5, shift: [-1, 1], scale: Some(-1.5), bias: None },
        ];
        for g in &ghosts {
            for k in 0..y.n {
                for r in 0..y.h {
                    for c in 0..y.w {
                        let (sr, sc) = (r as i64 - g.shift[0], c as i64 - g.shift[1]);
                        let v = if (0..12).contains(&sr) && (0..12).contains(&sc) {
                            g.scale() * y.at(k, g.source, sr as usize, sc as usize) + g.bias()
                        } else {
                            g.bias()
                        };
                        y.data[((k * 6 + g.channel) * 12 + r) * 12 + c] = v;
                    }
                }
            }
        }
        let w0: Vec<f32> = w_true.iter().zip(random(w_true.len(), 4)).map(|(a, e)| a + 0.3 * e).collect();
        let b0: Vec<f32> = b_true.iter().map(|v| v - 0.5).collect();
        let intrinsic = [0, 2, 3, 5];
        let (w, b) = refit(&x, &y, &w0, Some(&b0), geom, &intrinsic, &ghosts, 1e-7, 100_000).unwrap();
        let b = b.unwrap();
        for &s in &intrinsic {
            for i in 0..18 {
                assert!((w[s * 18 + i] - w_true[s * 18 + i]).abs() < 1e-3, "filter {s} tap {i}");
            }
            assert!((b[s] - b_true[s]).abs() < 1e-3, "bias {s}: {} vs {}", b[s], b_true[s]);
        }
        // Ghost filters are left as they were.
        assert_eq!(&w[18..36], &w0[18..36]);
    }

    #[test]
    fn shared_weights_refit_sums_every_use() {
        // One weight tensor read by two Convs with different inputs and different ghost maps
        // (no ghosts in the second use): the summed equations recover the true filters.
        let geom = ConvGeom { c_in: 3, c_out: 4, group: 1, kernel: [3, 3], pad: [1, 1] };
        let w_true = random(4 * 27, 7);
        let b_true = random(4, 8);
        let x1 = Maps { n: 1, c: 3, h: 10, w: 10, data: random(300, 9) };
        let x2 = Maps { n: 1, c: 3, h: 10, w: 10, data: random(300, 10) };
        let y1 = conv2d(&x1, &w_true, Some(&b_true), geom);
        let y2 = conv2d(&x2, &w_true, Some(&b_true), geom);
        // Use 1: channel 3 is an unshifted, scaled copy of 1 (exact by construction).
        let mut y1g = y1.clone();
        for i in 0..100 {
            y1g.data[300 + i] = 2.0 * y1.data[100 + i] - 0.1;
        }
        let ghosts1 =
            vec![Ghost { channel: 3, source: 1, shift: [0, 0], scale: Some(2.0), bias: Some(-0.1) }];
        let intrinsic = [0, 1, 2];
        let w0: Vec<f32> = w_true.iter().map(|v| v * 0.5).collect();
        let e1 = equations(&x1, &y1g, geom, true, &intrinsic, &ghosts1, 1000).unwrap();
        let e2 = equations(&x2, &y2, geom, true, &intrinsic, &[], 1000).unwrap();
        let (w, b) = solve(&w0, Some(&b_true), geom, &[e1, e2], 1e-8).unwrap();
        let b = b.unwrap();
        for &s in &intrinsic {
            for i in 0..27 {
                assert!((w[s * 27 + i] - w_true[s * 27 + i]).abs() < 1e-3, "filter {s} tap {i}");
            }
            assert!((b[s] - b_true[s]).abs() < 1e-3);
        }
        // Uses that keep different filters are refused.
        let e1 = equations(&x1, &y1, geom, true, &[0, 1], &[], 1000).unwrap();
        let e2 = equations(&x2, &y2, geom, true, &[0, 2], &[], 1000).unwrap();
        assert!(solve(&w0, Some(&b_true), geom, &[e1, e2], 1e-8).is_err());
    }
}
