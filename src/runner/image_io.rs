//! Image files: 8-bit RGB images in memory (row-major, interleaved), loaded from and saved to
//! PNG or JPEG with the `image` crate; greyscale, palette and alpha inputs become RGB the way
//! PIL's `convert('RGB')` makes them.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// An 8-bit image, `height` x `width` x `channels`, row-major with interleaved channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image {
    /// A zero image.
    pub fn new(height: usize, width: usize, channels: usize) -> Self {
        Image { height, width, channels, data: vec![0; height * width * channels] }
    }

    /// Wraps `data`, checking its length.
    pub fn from_vec(height: usize, width: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != height * width * channels {
            bail!("image data has {} bytes, expected {height}x{width}x{channels}", data.len());
        }
        Ok(Image { height, width, channels, data })
    }

    /// The top-left `height` x `width` part (the protocol's modcrop).
    pub fn crop_top_left(&self, height: usize, width: usize) -> Image {
        let (c, h, w) = (self.channels, height.min(self.height), width.min(self.width));
        let mut data = Vec::with_capacity(h * w * c);
        for row in self.data.chunks_exact(self.width * c).take(h) {
            data.extend_from_slice(&row[..w * c]);
        }
        Image { height: h, width: w, channels: c, data }
    }
}

/// Loads an image file as 8-bit RGB.
pub fn load_rgb(path: &Path) -> Result<Image> {
    let img = image::open(path).with_context(|| format!("reading image {}", path.display()))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    Image::from_vec(h as usize, w as usize, 3, rgb.into_raw())
}

/// Saves an 8-bit RGB image; the format follows the extension (`.png`, `.jpg`/`.jpeg`, JPEG at
/// quality 95).
pub fn save_rgb(path: &Path, img: &Image) -> Result<()> {
    if img.channels != 3 {
        bail!("save_rgb needs 3 channels, got {}", img.channels);
    }
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .context("image buffer size mismatch")?;
    match ext.as_str() {
        "png" => buf
            .save_with_format(path, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", path.display())),
        "jpg" | "jpeg" => {
            let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 95)
                .encode_image(&buf)
                .with_context(|| format!("writing {}", path.display()))
        }
        _ => bail!("cannot write {}: the output extension must be .png, .jpg or .jpeg", path.display()),
    }
}

/// The test pattern of the golden values taken from `sr_eval.py`:
/// `pat(h, w)[i, j, c] = (37 i + 91 j + 53 c + 7 i j + 29 seed) mod 256`.
#[cfg(test)]
pub(crate) fn test_pattern(h: usize, w: usize, seed: usize) -> Image {
    let mut img = Image::new(h, w, 3);
    for i in 0..h {
        for j in 0..w {
            for c in 0..3 {
                img.data[(i * w + j) * 3 + c] =
                    ((i * 37 + j * 91 + c * 53 + i * j * 7 + seed * 29) % 256) as u8;
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_and_crop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let data: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 13 % 256) as u8).collect();
        let img = Image::from_vec(5, 7, 3, data).unwrap();
        save_rgb(&p, &img).unwrap();
        assert_eq!(load_rgb(&p).unwrap(), img);
        let c = img.crop_top_left(4, 6);
        assert_eq!((c.height, c.width), (4, 6));
        assert_eq!(&c.data[..18], &img.data[..18]);
        assert_eq!(&c.data[18..36], &img.data[21..39]);
        assert!(save_rgb(&dir.path().join("a.bmp"), &img).is_err());
    }
}
