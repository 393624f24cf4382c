//! Calibration data: deterministic LR crops from a folder of HR images, made as the evaluation
//! protocol makes its inputs (modcrop, MATLAB bicubic downscale rounded to 8 bits), in the
//! model's input format: RGB in [0, 1], or Y / 255 for one-channel models; pre-upsampled
//! (VDSR-like) models get the bicubic-upscaled image, cropped to `size` x `size` input pixels.
//!
//! A crop is a random window of its image, or, with `candidates` > 1, the most *detailed* of
//! that many random windows: the one whose HR window differs most from the bicubic upscale of
//! its LR window (the energy of the SR residual, on Y), the part of the output the network
//! computes. The idea: flat sky or blur gives the least-squares fits little to learn from, and
//! ghosting loses most on sharp, high-contrast edges (Set5's bird and butterfly). Measured on
//! IMDN x2 it moves Set5 by about ±0.1 dB either way, the spread a different set of random crops
//! gives, so the default stays 1 (BENCHMARKS.md, "What limits IMDN at λ = 0.25").

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256Plus;

use crate::runner::bicubic::imresize;
use crate::runner::color::rgb_to_y;
use crate::runner::eval::image_files;
use crate::runner::image_io::{Image, load_rgb};

/// Where calibration images come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// The PNG/JPEG files of a folder (sorted by name).
    Dir(PathBuf),
    /// The small set of redistributable natural images compiled into the binary
    /// ([`super::builtin`]).
    Builtin,
}

impl ImageSource {
    /// How to name the source in messages.
    pub fn describe(&self) -> String {
        match self {
            ImageSource::Dir(d) => d.display().to_string(),
            ImageSource::Builtin => {
                format!("the built-in calibration set ({} images)", super::builtin::IMAGES.len())
            }
        }
    }

    /// The number of images.
    pub fn len(&self) -> Result<usize> {
        match self {
            ImageSource::Dir(d) => Ok(image_files(d)?.len()),
            ImageSource::Builtin => Ok(super::builtin::IMAGES.len()),
        }
    }

    /// Whether the source holds no image.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Image `i` of [`Self::len`], as 8-bit RGB, and its name for messages.
    fn load(&self, i: usize) -> Result<(String, Image)> {
        match self {
            ImageSource::Dir(d) => {
                let files = image_files(d)?;
                let path = files.get(i).context("calibration image index out of range")?;
                Ok((path.display().to_string(), load_rgb(path)?))
            }
            ImageSource::Builtin => super::builtin::load(i),
        }
    }
}

impl From<&Path> for ImageSource {
    fn from(p: &Path) -> Self {
        ImageSource::Dir(p.to_path_buf())
    }
}

impl From<&ImageSource> for ImageSource {
    fn from(s: &ImageSource) -> Self {
        s.clone()
    }
}

impl From<&PathBuf> for ImageSource {
    fn from(p: &PathBuf) -> Self {
        ImageSource::Dir(p.clone())
    }
}

/// The seed of the fitting crops' windows; [`HELD_OUT_SEED`] draws other windows of the same
/// images, to measure on crops the fits never saw.
pub const FIT_SEED: u64 = 0x5EED_CA11;
/// See [`FIT_SEED`].
pub const HELD_OUT_SEED: u64 = 0x0DD5_EED5;
/// The seed of the windows calibration's per-layer guard measures on (see [`FIT_SEED`]).
pub const GUARD_SEED: u64 = 0x6A4D_5EED;
use crate::runner::sr::{Channels, Chw};

/// The `size` x `size` window of `img` at `(y0, x0)`.
fn crop(img: &Image, y0: usize, x0: usize, size: usize) -> Image {
    let c = img.channels;
    let mut data = Vec::with_capacity(size * size * c);
    for y in y0..y0 + size {
        let base = (y * img.width + x0) * c;
        data.extend_from_slice(&img.data[base..base + size * c]);
    }
    Image { height: size, width: size, channels: c, data }
}

/// One calibration crop: the model input and the HR window it should become.
pub struct Sample {
    /// The model input (LR, or bicubic-upscaled LR for pre-upsampled models).
    pub lr: Chw,
    /// The matching window of the (modcropped) HR image, 8-bit RGB.
    pub hr: Image,
}

/// Where the crops come from and how they are made.
#[derive(Clone, Copy, Debug)]
pub struct CropSpec {
    /// Number of crops.
    pub count: usize,
    /// Side in model-input pixels.
    pub size: usize,
    /// Random windows drawn per crop; the one with the most SR-residual energy is kept (1: a
    /// plain random window).
    pub candidates: usize,
    pub channels: Channels,
    /// The SR factor used to make the LR image.
    pub scale: usize,
    /// The model takes the LR image upscaled back with the same bicubic (VDSR-like).
    pub pre_upsampled: bool,
}

/// `spec.count` crops. Images are taken evenly spread over the sorted folder (cycling when
/// `count` exceeds it); candidate positions come from a fixed seed per crop.
pub fn crops(src: impl Into<ImageSource>, spec: &CropSpec) -> Result<Vec<Chw>> {
    Ok(samples(src, spec)?.into_iter().map(|s| s.lr).collect())
}

/// Summed-area table of the squared Y difference between `hr` and `up` (same size), so the
/// residual energy of any window is four lookups.
fn residual_table(hr: &Image, up: &Image) -> Vec<f64> {
    let (h, w) = (hr.height, hr.width);
    let (a, b) = (rgb_to_y(hr), rgb_to_y(up));
    let mut t = vec![0.0; (h + 1) * (w + 1)];
    for y in 0..h {
        let mut row = 0.0;
        for x in 0..w {
            let d = a[y * w + x] - b[y * w + x];
            row += d * d;
            t[(y + 1) * (w + 1) + x + 1] = t[y * (w + 1) + x + 1] + row;
        }
    }
    t
}

/// The sum of the table's values over the `size` x `size` window at `(y0, x0)`.
fn window_sum(t: &[f64], width: usize, y0: usize, x0: usize, size: usize) -> f64 {
    let w = width + 1;
    let (y1, x1) = (y0 + size, x0 + size);
    t[y1 * w + x1] - t[y0 * w + x1] - t[y1 * w + x0] + t[y0 * w + x0]
}

/// [`crops`] with their HR windows, to measure quality on the calibration images.
pub fn samples(src: impl Into<ImageSource>, spec: &CropSpec) -> Result<Vec<Sample>> {
    samples_seeded(&src.into(), spec, FIT_SEED)
}

/// [`samples`] with the windows drawn from `seed` (crop `i` uses `seed + i`).
pub fn samples_seeded(src: &ImageSource, spec: &CropSpec, seed: u64) -> Result<Vec<Sample>> {
    let CropSpec { count, size, candidates, channels, scale, pre_upsampled } = *spec;
    if count == 0 || size < 8 {
        bail!("calibration needs at least one crop of at least 8x8 pixels");
    }
    let n = src.len()?;
    if n == 0 {
        bail!("{} holds no PNG or JPEG image", src.describe());
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let pick = if count <= n { i * n / count } else { i % n };
        let (path, hr) = src.load(pick)?;
        let hr = hr.crop_top_left(hr.height / scale * scale, hr.width / scale * scale);
        let mut lr = imresize(&hr, 1.0 / scale as f64);
        if pre_upsampled {
            lr = imresize(&lr, scale as f64);
        }
        if lr.height < size || lr.width < size {
            bail!(
                "calibration image {} is {}x{} after downscaling, smaller than --calib-size {size}",
                path,
                lr.width,
                lr.height
            );
        }
        // The LR image of a pre-upsampled model has the HR image's size.
        let f = if pre_upsampled { 1 } else { scale };
        let mut rng = Xoshiro256Plus::seed_from_u64(seed + i as u64);
        let mut draw = || (rng.gen_range(0..=lr.height - size), rng.gen_range(0..=lr.width - size));
        let (y0, x0) = if candidates <= 1 {
            draw()
        } else {
            let up = if pre_upsampled { lr.clone() } else { imresize(&lr, scale as f64) };
            let table = residual_table(&hr, &up);
            let score = |&(y, x): &(usize, usize)| window_sum(&table, hr.width, y * f, x * f, size * f);
            // Ties keep the earlier draw (deterministic; a flat image keeps the first window).
            let mut best = draw();
            let mut best_score = score(&best);
            for _ in 1..candidates {
                let wdw = draw();
                let s = score(&wdw);
                if s > best_score {
                    (best, best_score) = (wdw, s);
                }
            }
            best
        };
        let c = crop(&lr, y0, x0, size);
        let lr = match channels {
            Channels::Rgb => Chw::from_rgb(&c),
            Channels::Y => Chw::from_y(size, size, &rgb_to_y(&c)),
        };
        out.push(Sample { lr, hr: crop(&hr, y0 * f, x0 * f, size * f) });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::image_io::save_rgb;

    #[test]
    fn window_sums_match_a_direct_sum() {
        let (h, w) = (7, 9);
        let hr = Image::from_vec(h, w, 3, (0..h * w * 3).map(|i| (i * 37 % 251) as u8).collect()).unwrap();
        let up = Image::from_vec(h, w, 3, (0..h * w * 3).map(|i| (i * 11 % 253) as u8).collect()).unwrap();
        let t = residual_table(&hr, &up);
        let (a, b) = (rgb_to_y(&hr), rgb_to_y(&up));
        for (y0, x0, size) in [(0, 0, 3), (2, 5, 4), (4, 6, 3), (0, 0, 7)] {
            let direct: f64 = (y0..y0 + size)
                .flat_map(|y| (x0..x0 + size).map(move |x| y * w + x))
                .map(|i| (a[i] - b[i]).powi(2))
                .sum();
            let fast = window_sum(&t, w, y0, x0, size);
            assert!((fast - direct).abs() <= 1e-9 * direct.max(1.0), "{fast} vs {direct}");
        }
    }

    #[test]
    fn detailed_crops_come_from_the_detailed_part() {
        // Left half flat grey, right half a fine checkerboard: bicubic loses the checkerboard, so
        // the most detailed of many windows lies on the right; random windows fall anywhere.
        let dir = tempfile::tempdir().unwrap();
        let (h, w) = (64, 256);
        let mut img = Image::new(h, w, 3);
        for y in 0..h {
            for x in 0..w {
                let v = if x < w / 2 {
                    128
                } else if (x + y) % 2 == 0 {
                    30
                } else {
                    220
                };
                img.data[(y * w + x) * 3..(y * w + x) * 3 + 3].fill(v);
            }
        }
        save_rgb(&dir.path().join("a.png"), &img).unwrap();
        let spec = |candidates| CropSpec {
            count: 8,
            size: 16,
            candidates,
            channels: Channels::Rgb,
            scale: 2,
            pre_upsampled: false,
        };
        // A crop's HR window starts at column 2 * x0 of 256; the detailed half starts at 128.
        let flat_share = |s: &[Sample]| {
            s.iter().filter(|s| s.hr.data.chunks_exact(3).all(|p| p[0] == 128)).count() as f64
                / s.len() as f64
        };
        let random = samples(dir.path(), &spec(1)).unwrap();
        let detailed = samples(dir.path(), &spec(16)).unwrap();
        assert!(flat_share(&random) > 0.0, "the seed's random windows should include flat ones");
        assert_eq!(flat_share(&detailed), 0.0, "a flat window was kept over a detailed one");
        // Deterministic.
        let again = samples(dir.path(), &spec(16)).unwrap();
        assert!(detailed.iter().zip(&again).all(|(a, b)| a.hr == b.hr));
    }
}

/// Transform `t` (0..8) of the dihedral group of the square: bit 2 transposes, bit 0 flips
/// left-right, bit 1 flips top-bottom (0: the crop itself). Calibration's augmentation
/// (`--calib-augment`) adds these views of each fit crop: more equations, no more images.
pub fn dihedral(x: &Chw, t: usize) -> Chw {
    let transpose = t & 4 != 0;
    let (h, w) = if transpose { (x.width, x.height) } else { (x.height, x.width) };
    let mut data = Vec::with_capacity(x.data.len());
    for c in 0..x.channels {
        let plane = &x.data[c * x.height * x.width..(c + 1) * x.height * x.width];
        for y in 0..h {
            for xx in 0..w {
                let (yy, xs) =
                    (if t & 2 != 0 { h - 1 - y } else { y }, if t & 1 != 0 { w - 1 - xx } else { xx });
                let (sy, sx) = if transpose { (xs, yy) } else { (yy, xs) };
                data.push(plane[sy * x.width + sx]);
            }
        }
    }
    Chw { channels: x.channels, height: h, width: w, data }
}

/// `crops`, each followed by its first `views - 1` other [`dihedral`] views (`views` in 1..=8,
/// in the order transpose, then the flips, so that 2 views already mix orientations).
pub fn augment(crops: &[Chw], views: usize) -> Vec<Chw> {
    const ORDER: [usize; 8] = [0, 4, 3, 7, 1, 2, 5, 6];
    crops.iter().flat_map(|x| ORDER[..views.clamp(1, 8)].iter().map(|&t| dihedral(x, t))).collect()
}

#[cfg(test)]
mod augment_tests {
    use super::*;

    #[test]
    fn the_eight_views_are_distinct_permutations_of_the_crop() {
        // An asymmetric 2-channel 3x4 crop: every pixel a different value.
        let x = Chw { channels: 2, height: 3, width: 4, data: (0..24).map(|i| i as f32).collect() };
        let views = augment(std::slice::from_ref(&x), 8);
        assert_eq!(views.len(), 8);
        assert_eq!(views[0].data, x.data);
        for (i, v) in views.iter().enumerate() {
            let mut sorted = v.data.clone();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, x.data, "view {i} is not a permutation");
            // Channels stay apart: channel 0 holds 0..12 whatever the view.
            assert!(v.data[..12].iter().all(|&p| p < 12.0), "view {i} mixes channels");
            for w in &views[..i] {
                assert_ne!(w.data, v.data, "two views are equal");
            }
        }
        // A transposed view swaps the sides; a left-right flip reverses each row.
        assert_eq!((dihedral(&x, 4).height, dihedral(&x, 4).width), (4, 3));
        assert_eq!(&dihedral(&x, 1).data[..4], &[3.0, 2.0, 1.0, 0.0]);
        assert_eq!(&dihedral(&x, 4).data[..3], &[0.0, 4.0, 8.0]);
        assert_eq!(augment(std::slice::from_ref(&x), 1).len(), 1);
        assert_eq!(augment(&[x.clone(), x], 3).len(), 6);
    }
}
