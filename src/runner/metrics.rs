//! Quality metrics on the Y channel, as in `../shared/reference/sr_eval.py`: shave `shave`
//! pixels at every border, PSNR with peak 255 on the (unrounded, f64) MATLAB Y values. SSIM
//! (the reference script has none) is Wang et al.'s, as MATLAB's `ssim_index` and most SR
//! papers compute it: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255,
//! "valid" filtering, mean of the SSIM map, on the same shaved Y planes.

use anyhow::{Result, bail};

use super::color::rgb_to_y;
use super::image_io::Image;

/// A single-channel f64 plane, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Plane {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f64>,
}

impl Plane {
    /// The Y plane of an RGB image, with `shave` pixels removed at every border.
    pub fn y_shaved(img: &Image, shave: usize) -> Result<Plane> {
        if img.height <= 2 * shave || img.width <= 2 * shave {
            bail!("image {}x{} is too small to shave {shave} pixels", img.height, img.width);
        }
        let y = rgb_to_y(img);
        let (h, w) = (img.height - 2 * shave, img.width - 2 * shave);
        let mut data = Vec::with_capacity(h * w);
        for r in shave..shave + h {
            data.extend_from_slice(&y[r * img.width + shave..r * img.width + shave + w]);
        }
        Ok(Plane { height: h, width: w, data })
    }
}

fn check_same(a: &Plane, b: &Plane) -> Result<()> {
    if (a.height, a.width) != (b.height, b.width) {
        bail!("size mismatch: {}x{} vs {}x{}", a.height, a.width, b.height, b.width);
    }
    Ok(())
}

/// PSNR (dB, peak 255) between two planes; infinite when they are equal.
pub fn psnr(a: &Plane, b: &Plane) -> Result<f64> {
    check_same(a, b)?;
    let se: f64 = a.data.iter().zip(&b.data).map(|(x, y)| (x - y) * (x - y)).sum();
    let mse = se / a.data.len() as f64;
    Ok(10.0 * (255.0f64 * 255.0 / mse).log10())
}

/// PSNR on Y between two RGB images, shaving `shave` pixels (the protocol's `psnr_y`).
pub fn psnr_y(sr: &Image, hr: &Image, shave: usize) -> Result<f64> {
    psnr(&Plane::y_shaved(sr, shave)?, &Plane::y_shaved(hr, shave)?)
}

/// SSIM on Y between two RGB images, shaving `shave` pixels.
pub fn ssim_y(sr: &Image, hr: &Image, shave: usize) -> Result<f64> {
    ssim(&Plane::y_shaved(sr, shave)?, &Plane::y_shaved(hr, shave)?)
}

const WIN: usize = 11;

fn gaussian_1d() -> [f64; WIN] {
    let mut g = [0.0; WIN];
    for (i, v) in g.iter_mut().enumerate() {
        let d = i as f64 - 5.0;
        *v = (-(d * d) / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = g.iter().sum();
    g.map(|v| v / s)
}

/// "valid" separable Gaussian filtering: (h-10) x (w-10).
fn filter_valid(x: &[f64], h: usize, w: usize, g: &[f64; WIN]) -> Vec<f64> {
    let ow = w - WIN + 1;
    let oh = h - WIN + 1;
    let mut tmp = vec![0.0; h * ow];
    for r in 0..h {
        let row = &x[r * w..(r + 1) * w];
        for c in 0..ow {
            tmp[r * ow + c] = g.iter().zip(&row[c..c + WIN]).map(|(a, b)| a * b).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for r in 0..oh {
        for (k, gk) in g.iter().enumerate() {
            let src = &tmp[(r + k) * ow..(r + k + 1) * ow];
            for (o, s) in out[r * ow..(r + 1) * ow].iter_mut().zip(src) {
                *o += gk * s;
            }
        }
    }
    out
}

/// Mean SSIM between two planes of values in 0..255 (see the module doc).
pub fn ssim(a: &Plane, b: &Plane) -> Result<f64> {
    check_same(a, b)?;
    let (h, w) = (a.height, a.width);
    if h < WIN || w < WIN {
        bail!("SSIM needs at least {WIN}x{WIN} pixels, got {h}x{w}");
    }
    let g = gaussian_1d();
    let sq = |x: &[f64], y: &[f64]| -> Vec<f64> { x.iter().zip(y).map(|(p, q)| p * q).collect() };
    let mu1 = filter_valid(&a.data, h, w, &g);
    let mu2 = filter_valid(&b.data, h, w, &g);
    let e11 = filter_valid(&sq(&a.data, &a.data), h, w, &g);
    let e22 = filter_valid(&sq(&b.data, &b.data), h, w, &g);
    let e12 = filter_valid(&sq(&a.data, &b.data), h, w, &g);
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0;
    for i in 0..mu1.len() {
        let (m1, m2) = (mu1[i], mu2[i]);
        let s1 = e11[i] - m1 * m1;
        let s2 = e22[i] - m2 * m2;
        let s12 = e12[i] - m1 * m2;
        total += ((2.0 * m1 * m2 + c1) * (2.0 * s12 + c2)) / ((m1 * m1 + m2 * m2 + c1) * (s1 + s2 + c2));
    }
    Ok(total / mu1.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::runner::image_io::test_pattern as pat;

    /// `big2` of the golden script: pat(20, 23) plus ((5 j) mod 11) - 5 per column, clipped.
    fn perturbed(img: &Image) -> Image {
        let mut out = img.clone();
        for i in 0..img.height {
            for j in 0..img.width {
                for c in 0..3 {
                    let k = (i * img.width + j) * 3 + c;
                    let v = img.data[k] as i64 + ((j as i64 * 5) % 11) - 5;
                    out.data[k] = v.clamp(0, 255) as u8;
                }
            }
        }
        out
    }

    // Golden values: `psnr_y` of ../shared/reference/sr_eval.py, and for SSIM a direct numpy
    // implementation of the formula in the module doc (11x11 window, explicit loops), both on
    // the same patterns.
    #[test]
    fn psnr_matches_reference() {
        let p = psnr_y(&pat(9, 12, 0), &pat(9, 12, 1), 2).unwrap();
        assert!((p - 15.087951808682245).abs() < 1e-9, "{p}");
        let big = pat(20, 23, 0);
        let p = psnr_y(&perturbed(&big), &big, 2).unwrap();
        assert!((p - 39.4214568245321).abs() < 1e-9, "{p}");
        assert!(psnr_y(&big, &big, 2).unwrap().is_infinite());
    }

    #[test]
    fn ssim_matches_reference() {
        let big = pat(20, 23, 0);
        let s = ssim_y(&perturbed(&big), &big, 2).unwrap();
        assert!((s - 0.9979537959687731).abs() < 1e-12, "{s}");
        assert!((ssim_y(&big, &big, 2).unwrap() - 1.0).abs() < 1e-12);
        assert!(ssim_y(&pat(9, 12, 0), &pat(9, 12, 1), 2).is_err());
    }
}
