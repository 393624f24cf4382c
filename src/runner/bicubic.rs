//! MATLAB-compatible `imresize(img, scale, 'bicubic')`: the cubic kernel with a = -0.5,
//! antialiased when shrinking (the kernel is stretched by 1/scale), symmetric padding at the
//! borders, rows (dimension 0) resized before columns, and for 8-bit images rounding half away
//! from zero and clipping to 0..255 after *each* pass, as MATLAB's `imresizemex` does. A line
//! by line port of `_cubic`, `_contrib` and `imresize` in `../shared/reference/sr_eval.py`.

use super::image_io::Image;

fn cubic(x: f64) -> f64 {
    let ax = x.abs();
    let (ax2, ax3) = (ax * ax, ax * ax * ax);
    if ax <= 1.0 {
        1.5 * ax3 - 2.5 * ax2 + 1.0
    } else if ax <= 2.0 {
        -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    } else {
        0.0
    }
}

/// For each output index, the input indices (0-based, already mirrored) and normalised weights.
struct Contrib {
    taps: usize,
    weights: Vec<f64>,
    indices: Vec<usize>,
}

fn contributions(in_len: usize, out_len: usize, scale: f64) -> Contrib {
    let mut kw = 4.0;
    let antialias = scale < 1.0;
    if antialias {
        kw /= scale;
    }
    let h = |x: f64| {
        if antialias { scale * cubic(scale * x) } else { cubic(x) }
    };
    let taps = kw.ceil() as usize + 2;
    let n2 = 2 * in_len as i64;
    let mut weights = Vec::with_capacity(out_len * taps);
    let mut indices = Vec::with_capacity(out_len * taps);
    for o in 1..=out_len {
        let x = o as f64;
        let u = x / scale + 0.5 * (1.0 - 1.0 / scale);
        let left = (u - kw / 2.0).floor();
        let row: Vec<f64> = (0..taps).map(|k| h(u - (left + k as f64))).collect();
        let sum: f64 = row.iter().sum();
        for (k, w) in row.into_iter().enumerate() {
            weights.push(w / sum);
            // 1-based index `left + k`, mirrored: aux[(ind - 1) mod 2n] - 1.
            let m = (left as i64 + k as i64 - 1).rem_euclid(n2);
            indices.push(if m < in_len as i64 { m } else { n2 - 1 - m } as usize);
        }
    }
    Contrib { taps, weights, indices }
}

fn round_u8(v: f64) -> f64 {
    (v + 0.5).floor().clamp(0.0, 255.0)
}

/// Resizes an 8-bit image by `scale` (output size `ceil(size * scale)`), rounding to 8 bits
/// after each pass.
pub fn imresize(img: &Image, scale: f64) -> Image {
    let (h, w, c) = (img.height, img.width, img.channels);
    let oh = (h as f64 * scale).ceil() as usize;
    let ow = (w as f64 * scale).ceil() as usize;
    let src: Vec<f64> = img.data.iter().map(|&v| v as f64).collect();

    // Pass 1: rows (dimension 0), h x w x c -> oh x w x c.
    let cr = contributions(h, oh, scale);
    let mut mid = vec![0.0; oh * w * c];
    let row_len = w * c;
    for o in 0..oh {
        let out = &mut mid[o * row_len..(o + 1) * row_len];
        for k in 0..cr.taps {
            let wt = cr.weights[o * cr.taps + k];
            let i = cr.indices[o * cr.taps + k];
            for (d, s) in out.iter_mut().zip(&src[i * row_len..(i + 1) * row_len]) {
                *d += wt * s;
            }
        }
        out.iter_mut().for_each(|v| *v = round_u8(*v));
    }

    // Pass 2: columns (dimension 1), oh x w x c -> oh x ow x c.
    let cc = contributions(w, ow, scale);
    let mut data = vec![0u8; oh * ow * c];
    let mut acc = vec![0.0; c];
    for y in 0..oh {
        let row = &mid[y * row_len..(y + 1) * row_len];
        for o in 0..ow {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for k in 0..cc.taps {
                let wt = cc.weights[o * cc.taps + k];
                let i = cc.indices[o * cc.taps + k];
                for (a, s) in acc.iter_mut().zip(&row[i * c..(i + 1) * c]) {
                    *a += wt * s;
                }
            }
            for (ch, a) in acc.iter().enumerate() {
                data[(y * ow + o) * c + ch] = round_u8(*a) as u8;
            }
        }
    }
    Image { height: oh, width: ow, channels: c, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(h: usize, w: usize) -> Image {
        crate::runner::image_io::test_pattern(h, w, 0)
    }

    fn sum(img: &Image) -> u64 {
        img.data.iter().map(|&v| v as u64).sum()
    }

    // Golden values: `imresize` of ../shared/reference/sr_eval.py on the same 9x12x3 pattern
    // (numpy 2.4, run in the project venv).
    #[test]
    fn downscale_by_2_matches_reference() {
        let d2 = imresize(&pat(9, 12), 1.0 / 2.0);
        assert_eq!((d2.height, d2.width), (5, 6));
        let want: [u8; 90] = [
            71, 117, 147, 125, 134, 120, 113, 165, 121, 118, 116, 150, 134, 105, 118, 174, 102, 147, 123,
            133, 153, 132, 138, 141, 135, 131, 109, 110, 135, 137, 170, 115, 154, 146, 82, 117, 128, 155,
            142, 144, 139, 131, 144, 130, 119, 132, 115, 120, 116, 152, 108, 107, 159, 100, 118, 102, 132,
            133, 127, 122, 143, 145, 124, 146, 117, 134, 119, 117, 152, 89, 125, 174, 79, 151, 121, 148, 113,
            124, 88, 127, 131, 103, 145, 74, 155, 150, 118, 145, 104, 167,
        ];
        assert_eq!(d2.data, want);
        assert_eq!(sum(&d2), 11541);
    }

    #[test]
    fn downscale_by_3_and_upscale_match_reference() {
        let d3 = imresize(&pat(9, 12), 1.0 / 3.0);
        assert_eq!((d3.height, d3.width), (3, 4));
        let want: [u8; 36] = [
            98, 125, 141, 120, 149, 123, 125, 120, 139, 164, 96, 135, 132, 141, 145, 144, 133, 121, 131, 123,
            129, 120, 137, 113, 114, 124, 127, 132, 131, 123, 127, 132, 117, 116, 124, 160,
        ];
        assert_eq!(d3.data, want);

        let u2 = imresize(&d3, 2.0);
        assert_eq!((u2.height, u2.width), (6, 8));
        assert_eq!(sum(&u2), 18523);
        assert_eq!(
            u2.data[..24],
            [
                93, 121, 143, 100, 130, 137, 113, 148, 125, 120, 147, 125, 120, 129, 136, 133, 112, 141, 159,
                97, 138, 172, 89, 137
            ]
        );
        let u3 = imresize(&d3, 3.0);
        assert_eq!((u3.height, u3.width), (9, 12));
        assert_eq!(sum(&u3), 41673);
        assert_eq!(
            u3.data[..24],
            [
                91, 120, 143, 94, 123, 141, 101, 132, 135, 110, 145, 127, 117, 151, 123, 119, 145, 127, 119,
                132, 135, 124, 120, 140
            ]
        );
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Image::from_vec(7, 5, 1, vec![77; 35]).unwrap();
        for s in [0.5, 1.0 / 3.0, 2.0, 3.0] {
            let r = imresize(&img, s);
            assert!(r.data.iter().all(|&v| v == 77), "scale {s}");
        }
    }
}
