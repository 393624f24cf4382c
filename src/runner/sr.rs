//! Running an SR model on an image. The model's kind is found from its input (3-channel RGB or
//! 1-channel Y) and a small probe run (output size / input size: 1 means the model takes an
//! input that is already HR-sized, bicubic-upscaled, like VDSR; an integer > 1 is the model's
//! upscaling factor, like CARN-M or FSRCNN). Pre- and post-processing follow the evaluation
//! protocol of `../shared/reference/sr_eval.py` to the last rounding. Large inputs run in
//! overlapping tiles whose centres are kept, so memory stays bounded; with an overlap at least
//! as large as the receptive-field radius (in input pixels) of a purely convolutional model the
//! tiled result equals the whole-image one. Models with global operations (IMDN's channel
//! attention uses image-wide statistics) see slightly different results when tiled.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use ort::session::Session;
use ort::value::TensorRef;

use super::bicubic::imresize;
use super::color::{rgb_from_ycbcr, rgb_to_y, ycbcr_from_rgb};
use super::image_io::Image;
use super::session::{SessionConfig, open_session, ort_err};

/// A float tensor of one image, channels x height x width (batch 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Chw {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Chw {
    /// A zero tensor.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        Chw { channels, height, width, data: vec![0.0; channels * height * width] }
    }

    /// RGB pixels / 255 as f32 (the protocol's `lr.astype(float32) / 255`).
    pub fn from_rgb(img: &Image) -> Self {
        let (h, w) = (img.height, img.width);
        let mut t = Chw::zeros(3, h, w);
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                t.data[c * h * w + i] = v as f32 / 255.0;
            }
        }
        t
    }

    /// A one-channel tensor from f64 values / 255 (the protocol's `(y / 255).astype(float32)`).
    pub fn from_y(height: usize, width: usize, y: &[f64]) -> Self {
        let data = y.iter().map(|v| (v / 255.0) as f32).collect();
        Chw { channels: 1, height, width, data }
    }

    /// The `[y0, y1) x [x0, x1)` window.
    pub fn crop(&self, y0: usize, y1: usize, x0: usize, x1: usize) -> Chw {
        let (h, w) = (y1 - y0, x1 - x0);
        let mut data = Vec::with_capacity(self.channels * h * w);
        for c in 0..self.channels {
            for y in y0..y1 {
                let base = (c * self.height + y) * self.width;
                data.extend_from_slice(&self.data[base + x0..base + x1]);
            }
        }
        Chw { channels: self.channels, height: h, width: w, data }
    }

    /// RGB from a 3-channel output in [0, 1]: `clip(round(y * 255))` (half to even, in f32).
    pub fn to_rgb(&self) -> Result<Image> {
        ensure!(self.channels == 3, "expected a 3-channel output, got {}", self.channels);
        let n = self.height * self.width;
        let mut img = Image::new(self.height, self.width, 3);
        for i in 0..n {
            for c in 0..3 {
                let v = (self.data[c * n + i] * 255.0).round_ties_even().clamp(0.0, 255.0);
                img.data[i * 3 + c] = v as u8;
            }
        }
        Ok(img)
    }
}

/// Colour space of the model's input and output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channels {
    /// 3-channel RGB in [0, 1].
    Rgb,
    /// 1-channel Y / 255 (MATLAB Y in 16..235); chroma comes from bicubic upscaling.
    Y,
}

/// What a model takes and gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModelKind {
    pub channels: Channels,
    /// Output size / input size: 1 for models fed the bicubic-upscaled image (VDSR-like),
    /// otherwise the model's own scale.
    pub factor: usize,
}

impl ModelKind {
    /// Whether the model's input is the bicubic-upscaled (HR-sized) image.
    pub fn pre_upsampled(&self) -> bool {
        self.factor == 1
    }
}

/// How to split large inputs: tiles of `tile` x `tile` model-input pixels (0: never split), each
/// run with `overlap` extra pixels of context on every side that are cut away afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub tile: usize,
    pub overlap: usize,
}

impl Tiling {
    /// The whole image in one run.
    pub const NONE: Tiling = Tiling { tile: 0, overlap: 0 };
}

/// An ONNX SR model in a session, with its kind.
pub struct SrModel {
    session: Session,
    kind: ModelKind,
    path: PathBuf,
    /// Whether the model takes float16 (a half-precision export or `convert --fp16`): inputs
    /// are narrowed to it and outputs widened back, so callers keep working in f32.
    fp16: bool,
    /// Print per-tile progress on stderr when an image needs more than this many tiles.
    pub progress_above: usize,
}

const PROBE: usize = 16;

impl SrModel {
    /// Opens `path` and probes its kind.
    pub fn open(path: &Path, cfg: &SessionConfig) -> Result<SrModel> {
        let session = open_session(path, cfg)?;
        let fp16 = session.inputs().first().and_then(|i| i.dtype().tensor_type())
            == Some(ort::value::TensorElementType::Float16);
        let mut m = SrModel {
            session,
            kind: ModelKind { channels: Channels::Rgb, factor: 1 },
            path: path.to_path_buf(),
            fp16,
            progress_above: 4,
        };
        m.kind = m.probe().with_context(|| format!("probing {}", path.display()))?;
        Ok(m)
    }

    fn probe(&mut self) -> Result<ModelKind> {
        let inputs = self.session.inputs();
        ensure!(inputs.len() == 1, "expected one model input, found {}", inputs.len());
        let shape = inputs[0].dtype().tensor_shape().context("the model input is not a tensor")?;
        ensure!(shape.len() == 4, "expected an NCHW input, got shape {:?}", &shape[..]);
        let channels = match shape[1] {
            3 => Channels::Rgb,
            1 => Channels::Y,
            c => bail!("expected 1 or 3 input channels, got {c} (input shape {:?})", &shape[..]),
        };
        let c = if channels == Channels::Rgb { 3 } else { 1 };
        let out = self.infer(&Chw {
            channels: c,
            height: PROBE,
            width: PROBE,
            data: vec![0.5; c * PROBE * PROBE],
        })?;
        ensure!(out.channels == c, "output has {} channels, input {c}", out.channels);
        ensure!(
            out.height % PROBE == 0 && out.height == out.width && out.height >= PROBE,
            "a {PROBE}x{PROBE} input gave a {}x{} output: not an integer upscaling",
            out.height,
            out.width
        );
        Ok(ModelKind { channels, factor: out.height / PROBE })
    }

    /// The model's kind.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the model's input is float16.
    pub fn is_fp16(&self) -> bool {
        self.fp16
    }

    /// The underlying session (for benchmarks).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// One run on a whole input tensor.
    pub fn infer(&mut self, x: &Chw) -> Result<Chw> {
        let shape = [1usize, x.channels, x.height, x.width];
        let half: Vec<half::f16>;
        let input = if self.fp16 {
            half = x.data.iter().map(|&v| half::f16::from_f32(v)).collect();
            TensorRef::from_array_view((shape, &half[..])).map_err(ort_err)?.into_dyn()
        } else {
            TensorRef::from_array_view((shape, &x.data[..])).map_err(ort_err)?.into_dyn()
        };
        let outputs = self
            .session
            .run(ort::inputs![input])
            .map_err(ort_err)
            .with_context(|| format!("running {}", self.path.display()))?;
        let (shape, data) = if self.fp16 {
            let (shape, d) = outputs[0].try_extract_tensor::<half::f16>().map_err(ort_err)?;
            (shape, d.iter().map(|v| v.to_f32()).collect::<Vec<f32>>())
        } else {
            let (shape, d) = outputs[0].try_extract_tensor::<f32>().map_err(ort_err)?;
            (shape, d.to_vec())
        };
        ensure!(shape.len() == 4 && shape[0] == 1, "expected a [1, C, H, W] output, got {:?}", &shape[..]);
        Ok(Chw { channels: shape[1] as usize, height: shape[2] as usize, width: shape[3] as usize, data })
    }

    /// Runs `x` in overlapping tiles (see [`Tiling`]); one run when it fits in one tile.
    pub fn infer_tiled(&mut self, x: &Chw, tiling: Tiling) -> Result<Chw> {
        let t = tiling.tile;
        if t == 0 || (x.height <= t && x.width <= t) {
            return self.infer(x);
        }
        let f = self.kind.factor;
        let (h, w) = (x.height, x.width);
        let tiles: Vec<(usize, usize)> =
            (0..h).step_by(t).flat_map(|y| (0..w).step_by(t).map(move |xx| (y, xx))).collect();
        let show = tiles.len() > self.progress_above;
        let mut out: Option<Chw> = None;
        for (n, &(y0, x0)) in tiles.iter().enumerate() {
            if show {
                eprint!("\r{}: tile {}/{}", self.path.display(), n + 1, tiles.len());
            }
            let (y1, x1) = ((y0 + t).min(h), (x0 + t).min(w));
            let (ey0, ex0) = (y0.saturating_sub(tiling.overlap), x0.saturating_sub(tiling.overlap));
            let (ey1, ex1) = ((y1 + tiling.overlap).min(h), (x1 + tiling.overlap).min(w));
            let part = self.infer(&x.crop(ey0, ey1, ex0, ex1))?;
            ensure!(
                part.height == (ey1 - ey0) * f && part.width == (ex1 - ex0) * f,
                "tile output {}x{} is not {f}x the tile input {}x{}",
                part.height,
                part.width,
                ey1 - ey0,
                ex1 - ex0
            );
            let o = out.get_or_insert_with(|| Chw::zeros(part.channels, h * f, w * f));
            let (ow, pw) = (o.width, part.width);
            for c in 0..part.channels {
                for y in y0 * f..y1 * f {
                    let src = (c * part.height + (y - ey0 * f)) * pw + (x0 - ex0) * f;
                    let dst = (c * o.height + y) * ow + x0 * f;
                    let len = (x1 - x0) * f;
                    o.data[dst..dst + len].copy_from_slice(&part.data[src..src + len]);
                }
            }
        }
        if show {
            eprintln!();
        }
        Ok(out.expect("at least one tile"))
    }

    /// Super-resolves an 8-bit RGB LR image by `scale`, exactly as the protocol does: RGB models
    /// get LR/255 (or the bicubic-upscaled image when pre-upsampled) and their output is rounded
    /// to 8 bits; Y models get LR Y/255 (or bicubic Y/255 when pre-upsampled), and their output
    /// Y, clipped to 0..255, is merged with the bicubic image's Cb/Cr. `bicubic`, when given,
    /// must be `imresize(lr, scale)` (saves recomputing it).
    pub fn super_resolve(
        &mut self,
        lr: &Image,
        scale: usize,
        bicubic: Option<&Image>,
        tiling: Tiling,
    ) -> Result<Image> {
        ensure!(lr.channels == 3, "expected an RGB image");
        let kind = self.kind;
        if !kind.pre_upsampled() && kind.factor != scale {
            bail!("{} upscales by {}, not by the requested {scale}", self.path.display(), kind.factor);
        }
        let needs_bic = kind.pre_upsampled() || kind.channels == Channels::Y;
        let owned;
        let bic = match bicubic {
            Some(b) => Some(b),
            None if needs_bic => {
                owned = imresize(lr, scale as f64);
                Some(&owned)
            }
            None => None,
        };
        let (oh, ow) = (lr.height * scale, lr.width * scale);
        let sr = match kind.channels {
            Channels::Rgb => {
                let x = if kind.pre_upsampled() {
                    Chw::from_rgb(bic.expect("bicubic"))
                } else {
                    Chw::from_rgb(lr)
                };
                self.infer_tiled(&x, tiling)?.to_rgb()?
            }
            Channels::Y => {
                let bic = bic.expect("bicubic");
                let [yb, cb, cr] = ycbcr_from_rgb(bic);
                let x = if kind.pre_upsampled() {
                    Chw::from_y(bic.height, bic.width, &yb)
                } else {
                    Chw::from_y(lr.height, lr.width, &rgb_to_y(lr))
                };
                let out = self.infer_tiled(&x, tiling)?;
                ensure!(out.channels == 1, "expected a 1-channel output");
                ensure!(
                    (out.height, out.width) == (bic.height, bic.width),
                    "output {}x{} does not match the bicubic image {}x{}",
                    out.height,
                    out.width,
                    bic.height,
                    bic.width
                );
                // numpy: out * 255 and clip stay in float32, so does `y - 16` in rgb_from_ycbcr.
                let y: Vec<f64> =
                    out.data.iter().map(|&v| ((v * 255.0).clamp(0.0, 255.0) - 16.0) as f64 + 16.0).collect();
                rgb_from_ycbcr(out.height, out.width, &y, &cb, &cr)
            }
        };
        ensure!(
            (sr.height, sr.width) == (oh, ow),
            "SR output is {}x{}, expected {oh}x{ow}",
            sr.height,
            sr.width
        );
        Ok(sr)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::onnx::{
        AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto,
        TypeProto, ValueInfoProto,
        attribute_proto::AttributeType,
        tensor_shape_proto::{Dimension, dimension::Value as Dim},
        type_proto,
    };
    use prost::Message;

    fn value_info(name: &str, c: i64) -> ValueInfoProto {
        let dim = |v: Dim| Dimension { value: Some(v), ..Default::default() };
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto {
                        dim: vec![
                            dim(Dim::DimParam("N".into())),
                            dim(Dim::DimValue(c)),
                            dim(Dim::DimParam("H".into())),
                            dim(Dim::DimParam("W".into())),
                        ],
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Ints as i32),
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute: attrs,
            ..Default::default()
        }
    }

    fn weights(name: &str, dims: &[i64], seed: u32) -> TensorProto {
        let n: i64 = dims.iter().product();
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        let float_data = (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.4
            })
            .collect();
        TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(1),
            float_data,
            ..Default::default()
        }
    }

    /// A tiny conv-only SR model: Conv3x3(c->8) Relu Conv3x3(8->c*r*r) [DepthToSpace(r)], so its
    /// receptive-field radius is 2 input pixels. `r == 1` makes a pre-upsampled model.
    pub(crate) fn tiny_model(c: i64, r: i64) -> Vec<u8> {
        let conv = |i: &str, w: &str, b: &str, o: &str| {
            node("Conv", &[i, w, b], o, vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])])
        };
        let oc = c * r * r;
        let mut nodes = vec![
            conv("x", "w1", "b1", "h1"),
            node("Relu", &["h1"], "h2", vec![]),
            conv("h2", "w2", "b2", if r > 1 { "h3" } else { "y" }),
        ];
        if r > 1 {
            let mut bs = ints("blocksize", &[]);
            bs.r#type = Some(AttributeType::Int as i32);
            bs.i = Some(r);
            nodes.push(node("DepthToSpace", &["h3"], "y", vec![bs]));
        }
        let graph = GraphProto {
            name: Some("tiny".into()),
            node: nodes,
            initializer: vec![
                weights("w1", &[8, c, 3, 3], 1),
                weights("b1", &[8], 2),
                weights("w2", &[oc, 8, 3, 3], 3),
                weights("b2", &[oc], 4),
            ],
            input: vec![value_info("x", c)],
            output: vec![value_info("y", c)],
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            producer_name: Some("ghostsr-tests".into()),
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    pub(crate) fn open_tiny(c: i64, r: i64) -> (tempfile::TempDir, SrModel) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.onnx");
        std::fs::write(&p, tiny_model(c, r)).unwrap();
        let cfg = SessionConfig { threads: 1, ..Default::default() };
        let m = SrModel::open(&p, &cfg).expect("open the tiny model (is ORT_DYLIB_PATH set?)");
        (dir, m)
    }

    fn pattern(c: usize, h: usize, w: usize) -> Chw {
        let mut t = Chw::zeros(c, h, w);
        for (i, v) in t.data.iter_mut().enumerate() {
            *v = ((i * 7919) % 251) as f32 / 250.0;
        }
        t
    }

    #[test]
    fn detects_model_kinds() {
        let (_d, m) = open_tiny(3, 2);
        assert_eq!(m.kind(), ModelKind { channels: Channels::Rgb, factor: 2 });
        let (_d, m) = open_tiny(1, 3);
        assert_eq!(m.kind(), ModelKind { channels: Channels::Y, factor: 3 });
        let (_d, m) = open_tiny(1, 1);
        assert_eq!(m.kind(), ModelKind { channels: Channels::Y, factor: 1 });
        assert!(m.kind().pre_upsampled());
    }

    #[test]
    fn tiled_equals_untiled() {
        let (_d, mut m) = open_tiny(3, 2);
        m.progress_above = usize::MAX;
        let x = pattern(3, 37, 29);
        let whole = m.infer(&x).unwrap();
        assert_eq!((whole.channels, whole.height, whole.width), (3, 74, 58));
        for tiling in [Tiling { tile: 8, overlap: 2 }, Tiling { tile: 10, overlap: 4 }] {
            let tiled = m.infer_tiled(&x, tiling).unwrap();
            assert_eq!((tiled.height, tiled.width), (74, 58));
            let diff = whole.data.iter().zip(&tiled.data).map(|(a, b)| (a - b).abs());
            let max = diff.fold(0.0f32, f32::max);
            assert!(max < 1e-5, "{tiling:?}: max diff {max}");
        }
        // Too little overlap for the receptive field is visibly different.
        let bad = m.infer_tiled(&x, Tiling { tile: 8, overlap: 0 }).unwrap();
        assert!(whole.data.iter().zip(&bad.data).any(|(a, b)| (a - b).abs() > 1e-4));
    }

    #[test]
    fn super_resolve_sizes_and_scale_check() {
        let lr = Image::from_vec(6, 5, 3, (0..90).map(|i| (i * 3) as u8).collect()).unwrap();
        let (_d, mut m) = open_tiny(3, 2);
        let sr = m.super_resolve(&lr, 2, None, Tiling::NONE).unwrap();
        assert_eq!((sr.height, sr.width, sr.channels), (12, 10, 3));
        assert!(m.super_resolve(&lr, 3, None, Tiling::NONE).is_err());
        let (_d, mut m) = open_tiny(1, 1);
        let sr = m.super_resolve(&lr, 3, None, Tiling { tile: 8, overlap: 2 }).unwrap();
        assert_eq!((sr.height, sr.width), (18, 15));
        let (_d, mut m) = open_tiny(1, 2);
        let sr = m.super_resolve(&lr, 2, None, Tiling::NONE).unwrap();
        assert_eq!((sr.height, sr.width), (12, 10));
    }
}
