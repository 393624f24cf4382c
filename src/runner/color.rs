//! Colour conversions of the evaluation protocol (MATLAB `rgb2ycbcr`, BT.601 "studio swing"):
//! Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with RGB in 0..255, and the exact inverse
//! used to put a Y-channel model's output back together with bicubic chroma.

use super::image_io::Image;

/// The forward matrix (rows Y, Cb, Cr), applied to RGB in 0..255 and divided by 255.
const M: [[f64; 3]; 3] = [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]];

/// Y, Cb and Cr planes (f64, row-major) of an RGB image.
pub fn ycbcr_from_rgb(img: &Image) -> [Vec<f64>; 3] {
    assert_eq!(img.channels, 3, "ycbcr_from_rgb needs RGB");
    let n = img.height * img.width;
    let offs = [16.0, 128.0, 128.0];
    let mut out = [vec![0.0; n], vec![0.0; n], vec![0.0; n]];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        let (r, g, b) = (px[0] as f64, px[1] as f64, px[2] as f64);
        for k in 0..3 {
            out[k][i] = offs[k] + (M[k][0] * r + M[k][1] * g + M[k][2] * b) / 255.0;
        }
    }
    out
}

/// The Y plane (f64 in 16..235) of an RGB image, as MATLAB's `rgb2ycbcr`.
pub fn rgb_to_y(img: &Image) -> Vec<f64> {
    assert_eq!(img.channels, 3, "rgb_to_y needs RGB");
    img.data
        .chunks_exact(3)
        .map(|p| 16.0 + (65.481 * p[0] as f64 + 128.553 * p[1] as f64 + 24.966 * p[2] as f64) / 255.0)
        .collect()
}

fn inverse(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let a = m.map(|r| r.map(|v| v / 255.0));
    let det = a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    let mut inv = [[0.0; 3]; 3];
    for (i, row) in inv.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            // cofactor C[j][i] / det
            let (r0, r1) = ((j + 1) % 3, (j + 2) % 3);
            let (c0, c1) = ((i + 1) % 3, (i + 2) % 3);
            *v = (a[r0][c0] * a[r1][c1] - a[r0][c1] * a[r1][c0]) / det;
        }
    }
    inv
}

/// RGB from Y, Cb, Cr planes (values as in [`ycbcr_from_rgb`]) by the exact inverse matrix,
/// rounded half to even and clipped to 0..255 (numpy's `np.clip(np.round(.))`).
pub fn rgb_from_ycbcr(height: usize, width: usize, y: &[f64], cb: &[f64], cr: &[f64]) -> Image {
    let inv = inverse(M);
    let n = height * width;
    assert!(y.len() == n && cb.len() == n && cr.len() == n);
    let mut img = Image::new(height, width, 3);
    for (i, px) in img.data.chunks_exact_mut(3).enumerate() {
        let v = [y[i] - 16.0, cb[i] - 128.0, cr[i] - 128.0];
        for (out, row) in px.iter_mut().zip(&inv) {
            let x = row[0] * v[0] + row[1] * v[1] + row[2] * v[2];
            *out = x.round_ties_even().clamp(0.0, 255.0) as u8;
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::runner::image_io::test_pattern as pat;

    #[test]
    fn matches_reference_values() {
        // From sr_eval.py: rgb2y(pat(9,12))[0,:4], ycbcr_from_rgb(pat)[...][1,2] and
        // np.linalg.inv(M/255).
        let img = pat(9, 12, 0);
        let y = rgb_to_y(&img);
        let want = [53.09688235294118, 131.24982352941174, 184.3388588235294, 67.69688235294117];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert!((y.iter().sum::<f64>() - 13591.92908235294).abs() < 1e-9);
        let [yy, cb, cr] = ycbcr_from_rgb(&img);
        let i = 12 + 2;
        assert!((yy[i] - 99.08172941176471).abs() < 1e-12);
        assert!((cb[i] - 121.18905490196079).abs() < 1e-12);
        assert!((cr[i] - 213.3751294117647).abs() < 1e-12);
        let inv = inverse(M);
        assert!((inv[0][0] - 1.1643835616438356).abs() < 1e-12);
        assert!((inv[1][1] + 0.3917625399414501).abs() < 1e-12);
        assert!((inv[2][1] - 2.0172326395564593).abs() < 1e-12);
        assert!((inv[0][2] - 1.5960268873357042).abs() < 1e-12);
    }

    #[test]
    fn round_trip_is_exact() {
        let img = pat(9, 12, 0);
        let [y, cb, cr] = ycbcr_from_rgb(&img);
        assert_eq!(rgb_from_ycbcr(9, 12, &y, &cb, &cr), img);
    }
}
