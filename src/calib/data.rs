//! Calibration data: deterministic LR crops from a folder of HR images, made as the evaluation
//! protocol makes its inputs (modcrop, MATLAB bicubic downscale rounded to 8 bits), in the
//! model's input format: RGB in [0, 1], or Y / 255 for one-channel models; pre-upsampled
//! (VDSR-like) models get the bicubic-upscaled image, cropped to `size` x `size` input pixels.

use std::path::Path;

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256Plus;

use crate::runner::bicubic::imresize;
use crate::runner::color::rgb_to_y;
use crate::runner::eval::image_files;
use crate::runner::image_io::{Image, load_rgb};
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

/// `count` crops of `size` x `size` model-input pixels. Images are taken evenly spread over the
/// sorted folder (cycling when `count` exceeds it); crop positions come from a fixed seed.
/// `scale` is the SR factor used to make the LR image; `pre_upsampled` models get it upscaled
/// back with the same bicubic.
pub fn crops(
    dir: &Path,
    count: usize,
    size: usize,
    channels: Channels,
    scale: usize,
    pre_upsampled: bool,
) -> Result<Vec<Chw>> {
    Ok(samples(dir, count, size, channels, scale, pre_upsampled)?.into_iter().map(|s| s.lr).collect())
}

/// [`crops`] with their HR windows, to measure quality on the calibration images.
pub fn samples(
    dir: &Path,
    count: usize,
    size: usize,
    channels: Channels,
    scale: usize,
    pre_upsampled: bool,
) -> Result<Vec<Sample>> {
    if count == 0 || size < 8 {
        bail!("calibration needs at least one crop of at least 8x8 pixels");
    }
    let files = image_files(dir)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let pick = if count <= files.len() { i * files.len() / count } else { i % files.len() };
        let path = &files[pick];
        let hr = load_rgb(path)?;
        let hr = hr.crop_top_left(hr.height / scale * scale, hr.width / scale * scale);
        let mut lr = imresize(&hr, 1.0 / scale as f64);
        if pre_upsampled {
            lr = imresize(&lr, scale as f64);
        }
        if lr.height < size || lr.width < size {
            bail!(
                "calibration image {} is {}x{} after downscaling, smaller than --calib-size {size}",
                path.display(),
                lr.width,
                lr.height
            );
        }
        let mut rng = Xoshiro256Plus::seed_from_u64(0x5EED_CA11 + i as u64);
        let y0 = rng.gen_range(0..=lr.height - size);
        let x0 = rng.gen_range(0..=lr.width - size);
        let c = crop(&lr, y0, x0, size);
        let lr = match channels {
            Channels::Rgb => Chw::from_rgb(&c),
            Channels::Y => Chw::from_y(size, size, &rgb_to_y(&c)),
        };
        // The LR image of a pre-upsampled model has the HR image's size.
        let f = if pre_upsampled { 1 } else { scale };
        out.push(Sample { lr, hr: crop(&hr, y0 * f, x0 * f, size * f) });
    }
    Ok(out)
}
