//! Running SR models with ONNX Runtime (through the `ort` crate, loaded dynamically from
//! `ORT_DYLIB_PATH` or where [`locate`] finds it): sessions ([`session`]), image files
//! ([`image_io`]), the MATLAB-compatible bicubic resize ([`bicubic`]), colour conversions and
//! quality metrics ([`color`], [`metrics`]), whole-image and tiled inference ([`sr`]), and the
//! `upscale`, `eval` and `bench` verbs ([`upscale`], [`eval`], [`bench`]). The evaluation
//! protocol is the one in `../shared/reference/sr_eval.py`, reproduced step by step.

pub mod bench;
pub mod bicubic;
pub mod color;
pub mod cuda_plugin;
pub mod eval;
pub mod image_io;
pub mod locate;
pub mod metrics;
pub mod session;
pub mod sr;
pub mod upscale;
