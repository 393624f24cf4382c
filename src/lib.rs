//! ghostsr: make pretrained ONNX super-resolution networks cheaper with ghost features.
//!
//! The pipeline, one module per stage:
//! [`model`] reads and writes ONNX files losslessly; [`graph`] indexes a graph, infers channel
//! counts and shapes, and decides which Convs may be ghosted; [`plan`] is the one serialisable
//! description of a rewrite (and the k-means planner that makes one); [`emit`] applies a plan to
//! a model, in plugin form (`ai.ghostsr::GhostShift`) or in standard ONNX ops; [`report`] counts
//! parameters and multiply-adds. [`ops`] declares the GhostShift op and its CPU kernel, and
//! [`plugin`] registers it with ONNX Runtime (the cdylib `libghostsr.so`). [`runner`] runs models
//! through the `ort` crate (upscale, eval with the reference PSNR protocol, bench).
//! [`generate`] builds synthetic SR graphs for fixtures, tests and benchmarks. The CLI
//! (`src/main.rs`, [`cli`]) only orchestrates.

pub mod calib;
pub mod cli;
pub mod emit;
pub mod generate;
pub mod graph;
pub mod model;
pub mod onnx;
pub mod ops;
pub mod plan;
pub mod plugin;
pub mod report;
pub mod runner;
pub mod sweep;
pub mod weights;
