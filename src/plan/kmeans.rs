//! The training-free planner of the paper: k-means on a Conv's filters, the filter nearest each
//! centroid kept as intrinsic, every other filter a ghost of its cluster's intrinsic filter,
//! shifted by the offset that best aligns the two filters.
//!
//! Shift convention (GhostShift's: content moves by +dy rows, +dx columns). If ghost output
//! `y_g(h, w) = y_s(h - dy, w - dx)` then, for a cross-correlation, the ghost's filter is the
//! source's filter read at an offset: `W_g[c, i, j] = W_s[c, i + dy, j + dx]` (zero outside).
//! [`best_shift`] minimises exactly that mismatch; the test `shift_convention_matches_conv_output`
//! checks it against real convolution outputs. Layers are planned in parallel with rayon;
//! k-means starts from our own k-means++ seeding (one run), since linfa's k-means++ start alone
//! costs seconds on a 256 x 2304 layer.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use linfa::DatasetBase;
use linfa::prelude::*;
use linfa_clustering::{KMeans, KMeansInit};
use ndarray::Array2;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;
use rayon::prelude::*;

use crate::graph::GraphIndex;
use crate::graph::analysis::{Analysis, ConvInfo};
use crate::onnx;
use crate::plan::{Ghost, LayerPlan, Plan};

/// Planner settings.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Fraction λ of each layer's filters that become ghosts.
    pub ratio: f64,
    /// Per-layer λ (by Conv output name) overriding `ratio`; the quality budget
    /// (`crate::calib::budget`) fills it.
    pub layer_ratios: BTreeMap<String, f64>,
    pub seed: u64,
    pub max_shift: i64,
    /// Lloyd iteration cap (linfa). From a k-means++ start a few iterations settle nearly all
    /// assignments; each costs ~23 ms on a 256 x 2304 layer and dominates conversion time.
    pub max_iterations: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self { ratio: 0.5, layer_ratios: BTreeMap::new(), seed: 0, max_shift: 1, max_iterations: 5 }
    }
}

impl PlanOptions {
    /// λ of the Conv whose output is `conv_output`.
    pub fn ratio_for(&self, conv_output: &str) -> f64 {
        self.layer_ratios.get(conv_output).copied().unwrap_or(self.ratio)
    }

    /// The number of filters kept per group of `conv` (at least one).
    pub fn keep_per_group(&self, conv: &ConvInfo) -> usize {
        let per = conv.filters_per_group();
        ((per as f64) * (1.0 - self.ratio_for(&conv.output))).round().clamp(1.0, per as f64) as usize
    }
}

/// Plans every eligible Conv. `progress(done, total, layer)` is called as layers finish.
///
/// Convs that share their weight and bias initializers (CARN reuses one block several times) get
/// one plan, so the emitted model can share the reduced weights too.
pub fn plan_model(
    index: &GraphIndex<'_>,
    analysis: &Analysis,
    model_sha256: &str,
    opts: &PlanOptions,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<Plan> {
    let convs: Vec<&ConvInfo> = analysis.eligible().collect();
    let mut first_with_weights: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    let leaders: Vec<usize> = (0..convs.len())
        .map(|k| *first_with_weights.entry((&convs[k].weight, convs[k].bias.as_deref())).or_insert(k))
        .collect();
    let unique: Vec<usize> = (0..convs.len()).filter(|&k| leaders[k] == k).collect();
    let total = unique.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let planned: Result<HashMap<usize, LayerPlan>> = unique
        .par_iter()
        .map(|&k| {
            let conv = convs[k];
            let w = index.constant(&conv.weight).context("weights vanished")?;
            let weights = onnx::tensor_f32(w)?;
            // A per-layer seed keeps the plan independent of thread scheduling.
            let seed = opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(k as u64);
            let layer = plan_layer(conv, &weights, opts, seed)
                .with_context(|| format!("planning Conv \"{}\" (output \"{}\")", conv.node, conv.output))?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(n, total, &conv.output);
            Ok((k, layer))
        })
        .collect();
    let planned = planned?;
    let layers = convs
        .iter()
        .enumerate()
        .map(|(k, conv)| LayerPlan {
            conv_output: conv.output.clone(),
            node: conv.node.clone(),
            ..planned[&leaders[k]].clone()
        })
        .collect();
    Ok(Plan::new(model_sha256, opts.max_shift, layers))
}

/// Plans one Conv given its weights `[c_out, c_in/group, kh, kw]`.
pub fn plan_layer(conv: &ConvInfo, weights: &[f32], opts: &PlanOptions, seed: u64) -> Result<LayerPlan> {
    if let Some(i) = weights.iter().position(|v| !v.is_finite()) {
        anyhow::bail!("weight element {i} of '{}' is {} (not a finite number)", conv.weight, weights[i]);
    }
    if weights.len() != conv.c_out * (conv.c_in / conv.group) * conv.kernel[0] * conv.kernel[1]
        || conv.c_out == 0
    {
        anyhow::bail!("weights of '{}' do not match the Conv's shape", conv.weight);
    }
    let per = conv.filters_per_group();
    let dim = weights.len() / conv.c_out;
    let keep = opts.keep_per_group(conv);
    let mut intrinsic = Vec::new();
    let mut ghosts = Vec::new();
    for g in 0..conv.group {
        let base = g * per;
        let rows = &weights[base * dim..(base + per) * dim];
        let (kept, source_of) =
            select_intrinsic(rows, per, dim, keep, opts.max_iterations, seed.wrapping_add(g as u64))?;
        intrinsic.extend(kept.iter().map(|&c| base + c));
        for (c, src) in source_of.iter().enumerate() {
            if let Some(s) = *src {
                let shift = best_shift(
                    &rows[c * dim..(c + 1) * dim],
                    &rows[s * dim..(s + 1) * dim],
                    conv.kernel,
                    opts.max_shift,
                );
                ghosts.push(Ghost { channel: base + c, source: base + s, shift, scale: None, bias: None });
            }
        }
    }
    intrinsic.sort_unstable();
    Ok(LayerPlan {
        conv_output: conv.output.clone(),
        node: conv.node.clone(),
        out_channels: conv.c_out,
        intrinsic,
        ghosts,
    })
}

fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Clusters `n` rows of length `dim` into `keep` clusters; returns the kept rows (ascending) and,
/// for every row, `Some(source)` when it is a ghost or `None` when it is kept.
fn select_intrinsic(
    rows: &[f32],
    n: usize,
    dim: usize,
    keep: usize,
    max_iterations: u64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<Option<usize>>)> {
    if keep >= n {
        return Ok(((0..n).collect(), vec![None; n]));
    }
    let data = Array2::from_shape_vec((n, dim), rows.to_vec())?;
    let dataset = DatasetBase::from(data.clone());
    let init = plus_plus_init(&data, keep, seed);
    let model = KMeans::params_with_rng(keep, Xoshiro256Plus::seed_from_u64(seed))
        .init_method(KMeansInit::Precomputed(init))
        .n_runs(1)
        .max_n_iterations(max_iterations)
        .tolerance(1e-5)
        .fit(&dataset)
        .context("k-means failed")?;
    let centroids = model.centroids();
    // Assign with one matrix product (|x|² - 2x·c + |c|², |x|² dropped): 10x faster than
    // linfa's per-pair predict on a 256 x 2304 layer.
    let cross = data.dot(&centroids.t());
    let c_sq: Vec<f32> = centroids.rows().into_iter().map(|c| c.dot(&c)).collect();
    let labels: Vec<usize> = cross
        .rows()
        .into_iter()
        .map(|r| {
            (0..keep).min_by(|&a, &b| (c_sq[a] - 2.0 * r[a]).total_cmp(&(c_sq[b] - 2.0 * r[b]))).unwrap_or(0)
        })
        .collect();
    // The member nearest each centroid is that cluster's intrinsic filter.
    let mut rep: Vec<Option<(usize, f32)>> = vec![None; keep];
    for (i, &l) in labels.iter().enumerate() {
        let d = dist2(&rows[i * dim..(i + 1) * dim], centroids.row(l).as_slice().unwrap_or(&[]));
        if rep[l].is_none_or(|(_, best)| d < best) {
            rep[l] = Some((i, d));
        }
    }
    let mut is_kept = vec![false; n];
    for (i, _) in rep.iter().flatten() {
        is_kept[*i] = true;
    }
    let mut source: Vec<Option<usize>> =
        (0..n).map(|i| if is_kept[i] { None } else { rep[labels[i]].map(|(r, _)| r) }).collect();
    // Empty clusters (duplicate filters, unlucky starts) leave fewer than `keep` kept filters:
    // promote the ghost worst served by its source until the count is right.
    let mut kept_count = is_kept.iter().filter(|&&k| k).count();
    while kept_count < keep {
        let worst = (0..n)
            .filter(|&i| !is_kept[i])
            .map(|i| {
                let s = source[i].unwrap_or(i);
                (i, dist2(&rows[i * dim..(i + 1) * dim], &rows[s * dim..(s + 1) * dim]))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
            .expect("fewer kept than rows");
        is_kept[worst] = true;
        source[worst] = None;
        kept_count += 1;
    }
    let kept: Vec<usize> = (0..n).filter(|&i| is_kept[i]).collect();
    Ok((kept, source))
}

/// k-means++ seeding (D² sampling) from the pairwise distance matrix, computed once with one
/// matrix product (`|a|² + |b|² - 2ab`): O(n² dim) in a GEMM, then O(keep * n). linfa's own
/// k-means++ costs seconds per large layer.
fn plus_plus_init(data: &Array2<f32>, keep: usize, seed: u64) -> Array2<f32> {
    use rand::Rng;
    let n = data.nrows();
    let gram = data.dot(&data.t());
    let d = |i: usize, j: usize| (gram[[i, i]] + gram[[j, j]] - 2.0 * gram[[i, j]]).max(0.0);
    let mut rng = Xoshiro256Plus::seed_from_u64(seed);
    let mut centres = vec![rng.gen_range(0..n)];
    let mut nearest: Vec<f32> = (0..n).map(|i| d(i, centres[0])).collect();
    while centres.len() < keep {
        let total: f64 = nearest.iter().map(|&v| v as f64).sum();
        let next = if total > 0.0 && total.is_finite() {
            let mut target = rng.gen_range(0.0..total);
            let mut pick = n - 1;
            for (i, &v) in nearest.iter().enumerate() {
                target -= v as f64;
                if target < 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            // Every row coincides with a centre already: any unused row will do.
            (0..n).find(|i| !centres.contains(i)).unwrap_or(0)
        };
        centres.push(next);
        for (i, v) in nearest.iter_mut().enumerate() {
            *v = v.min(d(i, next));
        }
    }
    data.select(ndarray::Axis(0), &centres)
}

/// The offset `[dy, dx]` (each within `max_shift`) minimising
/// `sum (ghost[c,i,j] - source[c,i+dy,j+dx])^2`, zero outside the kernel. Ties go to the
/// smaller shift, so identical filters get `[0, 0]`.
pub fn best_shift(ghost: &[f32], source: &[f32], kernel: [usize; 2], max_shift: i64) -> [i64; 2] {
    let [kh, kw] = kernel;
    let plane = kh * kw;
    let channels = ghost.len() / plane.max(1);
    let mut offsets: Vec<[i64; 2]> = Vec::new();
    for dy in -max_shift..=max_shift {
        for dx in -max_shift..=max_shift {
            offsets.push([dy, dx]);
        }
    }
    offsets.sort_by_key(|[dy, dx]| (dy.abs() + dx.abs(), dy.abs().max(dx.abs()), *dy, *dx));
    let mut best = ([0, 0], f32::INFINITY);
    for [dy, dx] in offsets {
        let mut d = 0.0f32;
        for c in 0..channels {
            let g = &ghost[c * plane..(c + 1) * plane];
            let s = &source[c * plane..(c + 1) * plane];
            for i in 0..kh {
                for j in 0..kw {
                    let (si, sj) = (i as i64 + dy, j as i64 + dx);
                    let sv = if si >= 0 && sj >= 0 && (si as usize) < kh && (sj as usize) < kw {
                        s[si as usize * kw + sj as usize]
                    } else {
                        0.0
                    };
                    let e = g[i * kw + j] - sv;
                    d += e * e;
                }
            }
        }
        if d < best.1 {
            best = ([dy, dx], d);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::analysis::Verdict;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    /// Plain cross-correlation with zero padding `pad`, one image, stride 1.
    fn conv2d(x: &[f32], c_in: usize, h: usize, w: usize, filt: &[f32], k: usize, pad: usize) -> Vec<f32> {
        let mut y = vec![0.0; h * w];
        for oy in 0..h {
            for ox in 0..w {
                let mut acc = 0.0;
                for c in 0..c_in {
                    for i in 0..k {
                        for j in 0..k {
                            let (iy, ix) =
                                (oy as i64 + i as i64 - pad as i64, ox as i64 + j as i64 - pad as i64);
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                acc += filt[(c * k + i) * k + j] * x[(c * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                }
                y[oy * w + ox] = acc;
            }
        }
        y
    }

    /// Proves the direction convention: a ghost filter built as the source filter read at
    /// offset (dy, dx) is found with shift [dy, dx], and its conv output equals the source's
    /// output moved by +dy rows and +dx columns (GhostShift's meaning) away from the border.
    #[test]
    fn shift_convention_matches_conv_output() {
        let (c_in, k, h, w) = (2usize, 5usize, 9usize, 11usize);
        let mut seed = 7;
        // Source filter with a zero outer ring, so a one-tap translation loses nothing.
        let mut src = vec![0.0f32; c_in * k * k];
        for c in 0..c_in {
            for i in 1..k - 1 {
                for j in 1..k - 1 {
                    src[(c * k + i) * k + j] = lcg(&mut seed);
                }
            }
        }
        let x: Vec<f32> = (0..c_in * h * w).map(|_| lcg(&mut seed)).collect();
        for (dy, dx) in [(1i64, 0i64), (0, 1), (-1, 1), (1, -1), (-1, -1)] {
            let mut ghost = vec![0.0f32; c_in * k * k];
            for c in 0..c_in {
                for i in 0..k as i64 {
                    for j in 0..k as i64 {
                        let (si, sj) = (i + dy, j + dx);
                        if (0..k as i64).contains(&si) && (0..k as i64).contains(&sj) {
                            ghost[(c * k) * k + (i as usize) * k + j as usize] =
                                src[(c * k) * k + (si as usize) * k + sj as usize];
                        }
                    }
                }
            }
            assert_eq!(best_shift(&ghost, &src, [k, k], 1), [dy, dx]);
            let ys = conv2d(&x, c_in, h, w, &src, k, 2);
            let yg = conv2d(&x, c_in, h, w, &ghost, k, 2);
            // Interior only: near the border the zero padding differs.
            for oy in 3..h - 3 {
                for ox in 3..w - 3 {
                    let shifted = ys[(oy as i64 - dy) as usize * w + (ox as i64 - dx) as usize];
                    assert!((yg[oy * w + ox] - shifted).abs() < 1e-5, "({dy},{dx}) at ({oy},{ox})");
                }
            }
        }
    }

    fn conv_info(c_out: usize, group: usize) -> ConvInfo {
        ConvInfo {
            node_index: 0,
            node: "c".into(),
            output: "y".into(),
            input: "x".into(),
            weight: "w".into(),
            bias: None,
            c_out,
            c_in: 4 * group,
            group,
            kernel: [3, 3],
            verdict: Verdict::Eligible { forced: false },
        }
    }

    #[test]
    fn planted_ghosts_are_found_and_plans_are_deterministic() {
        // 8 distinct filters and 8 near copies of them: at ratio 0.5 k-means must pair each
        // copy with its original, keep one of the two and make the other its unshifted ghost.
        let dim = 4 * 9;
        let mut seed = 3;
        let mut w = vec![0.0f32; 16 * dim];
        for f in 0..8 {
            for e in 0..dim {
                let v = lcg(&mut seed);
                w[f * dim + e] = v;
                w[(8 + f) * dim + e] = v + 1e-3 * lcg(&mut seed);
            }
        }
        let conv = conv_info(16, 1);
        let opts = PlanOptions::default();
        let plan = plan_layer(&conv, &w, &opts, 1).unwrap();
        plan.validate(16, 1, 1).unwrap();
        assert_eq!(plan.intrinsic.len(), 8);
        for g in &plan.ghosts {
            let pair = if g.channel >= 8 { g.channel - 8 } else { g.channel + 8 };
            assert_eq!(g.source, pair, "ghost {} should come from its planted pair", g.channel);
            assert_eq!(g.shift, [0, 0]);
        }
        assert_eq!(plan, plan_layer(&conv, &w, &opts, 1).unwrap());
    }

    #[test]
    fn grouped_convs_keep_equal_counts_per_group_and_ratio_zero_keeps_all() {
        let mut seed = 11;
        let conv = conv_info(16, 4);
        let w: Vec<f32> = (0..16 * 4 * 9).map(|_| lcg(&mut seed)).collect();
        let plan = plan_layer(&conv, &w, &PlanOptions::default(), 5).unwrap();
        plan.validate(16, 4, 1).unwrap();
        for g in &plan.ghosts {
            assert_eq!(g.channel / 4, g.source / 4, "sources stay in their group");
        }
        let none = plan_layer(&conv, &w, &PlanOptions { ratio: 0.0, ..Default::default() }, 5).unwrap();
        assert!(none.ghosts.is_empty());
        assert_eq!(none.intrinsic.len(), 16);
    }
}
