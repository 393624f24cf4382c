//! The built-in calibration set: six 256 x 256 natural photographs (public domain or CC0, from
//! scikit-image's sample data; `fixtures/calib/LICENSES.md` lists each one's source and licence)
//! compiled into the binary, so that `convert` calibrates by default, from an installed binary,
//! with no image folder and no source tree. Six crops of 256 pixels keep the set near 0.5 MB while
//! giving x2..x4 models LR windows of at least 64 pixels.

use anyhow::{Context, Result};

use crate::runner::image_io::Image;

/// `(name, PNG bytes)` of every built-in image, in a fixed order.
pub const IMAGES: [(&str, &[u8]); 6] = [
    ("astronaut.png", include_bytes!("../../fixtures/calib/astronaut.png")),
    ("brick.png", include_bytes!("../../fixtures/calib/brick.png")),
    ("camera.png", include_bytes!("../../fixtures/calib/camera.png")),
    ("chelsea.png", include_bytes!("../../fixtures/calib/chelsea.png")),
    ("coffee.png", include_bytes!("../../fixtures/calib/coffee.png")),
    ("rocket.png", include_bytes!("../../fixtures/calib/rocket.png")),
];

/// Built-in image `i`, decoded to 8-bit RGB, with a name for messages.
pub fn load(i: usize) -> Result<(String, Image)> {
    let (name, bytes) = IMAGES.get(i).context("built-in calibration image index out of range")?;
    let img = image::load_from_memory(bytes).with_context(|| format!("decoding built-in image {name}"))?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    Ok((format!("built-in:{name}"), Image::from_vec(h as usize, w as usize, 3, rgb.into_raw())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_image_decodes_to_256_square_rgb() {
        for i in 0..IMAGES.len() {
            let (name, img) = load(i).unwrap();
            assert_eq!((img.height, img.width, img.channels), (256, 256, 3), "{name}");
            // Natural images, not blank: a spread of grey levels.
            let (lo, hi) = img.data.iter().fold((255u8, 0u8), |(l, h), &v| (l.min(v), h.max(v)));
            assert!(hi - lo > 100, "{name} has a grey range of {lo}..{hi}");
        }
        assert!(load(IMAGES.len()).is_err());
    }
}
