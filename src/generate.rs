//! Synthetic super-resolution graphs: this module owns the `ghostsr generate` generator, which
//! builds EDSR, EDSR-baseline, RDN-style and RCAN-style ONNX models (opset 17, IR version 8) with
//! deterministic, seeded weights, for fixtures, tests and benchmarks. Every graph has one float
//! input `input` of shape `[n, 3, h, w]` and one output `output` of shape
//! `[n, 3, h*scale, w*scale]`, and follows the same outline: a 3->C 3x3 head conv, an
//! architecture-specific body ending in its own conv(s), a global residual `Add` with the head
//! output, a sub-pixel upsampler (Conv + `DepthToSpace`, mode DCR; two x2 stages for x4) and a
//! C->3 3x3 tail conv. Optionally ([`GenSpec::planted_ghosts`], off in every preset) a fraction of
//! the filters of every 3x3 body conv is planted as a spatially shifted copy of another filter of
//! the same conv, so a ghost planner has real redundancy to find. The graph builder used here is
//! private; reading, counting and rewriting models belong to other modules.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use prost::Message;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

/// ONNX opset of the default domain used by every generated model.
pub const OPSET: i64 = 17;
/// ONNX IR version of every generated model.
pub const IR_VERSION: i64 = 8;
/// `producer_name` of every generated model.
pub const PRODUCER_NAME: &str = "ghostsr-generate";

/// Residual scaling of the EDSR (full) residual blocks, applied as a `Mul` by a scalar.
const EDSR_RES_SCALE: f32 = 0.1;
/// Dense layers per residual dense block (RDN).
const RDN_LAYERS: usize = 4;
/// Residual channel-attention blocks per residual group (RCAN).
const RCAN_BLOCKS_PER_GROUP: usize = 4;
/// Channel reduction of the RCAN channel attention (C -> C/16 -> C).
const RCAN_REDUCTION: usize = 16;
/// Init scale of the last conv of each residual branch, so deep stacks stay bounded.
const RESIDUAL_INIT_SCALE: f32 = 0.1;
/// Planted ghosts are `shifted copy + uniform noise` with this fraction of the weight bound.
const GHOST_NOISE: f32 = 0.02;
/// A serialized ModelProto must stay under protobuf's 2 GiB limit.
const MAX_MODEL_BYTES: usize = i32::MAX as usize;

/// The architecture family of a generated model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Arch {
    /// EDSR: residual blocks (conv3x3-relu-conv3x3, residual scaling 0.1); preset 32 blocks x 256 channels.
    Edsr,
    /// EDSR-baseline: like EDSR without residual scaling; preset 16 blocks x 64 channels.
    EdsrBaseline,
    /// RDN-style: residual dense blocks (4 dense layers, growth C/2, 1x1 local fusion, local residual)
    /// and global feature fusion; preset 4 blocks x 64 channels.
    Rdn,
    /// RCAN-style: residual groups of 4 residual channel-attention blocks each; `blocks` counts
    /// groups; preset 2 groups x 64 channels.
    Rcan,
}

impl Arch {
    /// The lower-case name used on the command line and in graph names (`edsr-baseline`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Edsr => "edsr",
            Arch::EdsrBaseline => "edsr-baseline",
            Arch::Rdn => "rdn",
            Arch::Rcan => "rcan",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that determines a generated model: same spec, same bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GenSpec {
    /// Architecture family.
    pub arch: Arch,
    /// Upscaling factor: 2, 3 or 4.
    pub scale: u32,
    /// Body depth: residual blocks (EDSR, EDSR-baseline), residual dense blocks (RDN) or residual
    /// groups of 4 channel-attention blocks each (RCAN).
    pub blocks: usize,
    /// Feature channels C of the body.
    pub channels: usize,
    /// Seed of the weights (Xoshiro256++).
    pub seed: u64,
    /// Fraction in [0, 1) of the output filters of every 3x3 body conv that is planted as a
    /// spatially shifted copy (one tap in one of the 8 directions, zero fill) of another filter
    /// of the same conv, plus small noise; the taps of that primary filter which the shift would
    /// drop are zeroed, so the ghost's feature map is the primary's shifted by one pixel (up to
    /// the noise and the image border). 0 in every preset: set it to give a ghost planner
    /// redundancy to find.
    pub planted_ghosts: f32,
}

impl GenSpec {
    /// The standard size of `arch` at `scale`, with seed 0 and no planted ghosts: EDSR 32 x 256
    /// (x2: 40,729,603 params), EDSR-baseline 16 x 64 (x2: 1,369,859), RDN 4 blocks x 64
    /// channels (x2: 770,627), RCAN 2 groups x 4 blocks x 64 channels (x2: 857,507). Params are
    /// conv weights and biases, upsampler included.
    pub fn preset(arch: Arch, scale: u32) -> GenSpec {
        let (blocks, channels) = match arch {
            Arch::Edsr => (32, 256),
            Arch::EdsrBaseline => (16, 64),
            Arch::Rdn => (4, 64),
            Arch::Rcan => (2, 64),
        };
        GenSpec { arch, scale, blocks, channels, seed: 0, planted_ghosts: 0.0 }
    }

    /// Checks that the spec describes a model [`generate`] can build.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !matches!(self.scale, 2..=4) {
            bail!("scale must be 2, 3 or 4, got {}", self.scale);
        }
        if self.blocks == 0 {
            bail!("blocks must be at least 1");
        }
        if self.channels == 0 {
            bail!("channels must be at least 1");
        }
        if self.arch == Arch::Rdn && self.channels < 2 {
            bail!("rdn needs at least 2 channels (growth is channels/2)");
        }
        if !(0.0..1.0).contains(&self.planted_ghosts) {
            bail!("planted ghosts must be a fraction in [0, 1), got {}", self.planted_ghosts);
        }
        Ok(())
    }

    /// A short identifier such as `edsr_x2`, used as the graph name.
    fn graph_name(&self) -> String {
        format!("{}_x{}", self.arch.name().replace('-', "_"), self.scale)
    }
}

/// Builds the model described by `spec`.
///
/// # Panics
/// If `spec` is invalid (see [`GenSpec::validate`]).
pub fn generate(spec: &GenSpec) -> ModelProto {
    if let Err(e) = spec.validate() {
        panic!("invalid GenSpec: {e:#}");
    }
    let mut b = Builder::new(spec.seed, spec.planted_ghosts);
    let c = spec.channels;

    let head = b.conv("/head", "input", 3, c, 3, Init::LINEAR);
    let body = match spec.arch {
        Arch::Edsr => edsr_body(&mut b, &head, spec, Some(EDSR_RES_SCALE)),
        Arch::EdsrBaseline => edsr_body(&mut b, &head, spec, None),
        Arch::Rdn => rdn_body(&mut b, &head, spec),
        Arch::Rcan => rcan_body(&mut b, &head, spec),
    };
    let mut x = b.add("/global_residual", &body, &head);

    let stages: &[u32] = match spec.scale {
        2 => &[2],
        3 => &[3],
        _ => &[2, 2],
    };
    for (i, &s) in stages.iter().enumerate() {
        let scope = format!("/upsample/{i}");
        let s2 = (s * s) as usize;
        let y = b.conv(&scope, &x, c, c * s2, 3, Init::LINEAR);
        x = b.node(
            &scope,
            "DepthToSpace",
            &[&y],
            vec![attr_int("blocksize", s.into()), attr_str("mode", "DCR")],
        );
    }
    let out = b.conv("/tail", &x, c, 3, 3, Init::LINEAR);
    b.finish(spec, &out)
}

/// EDSR / EDSR-baseline body: `blocks` x (conv-relu-conv [* res_scale] + skip), then a 3x3 conv.
fn edsr_body(b: &mut Builder, x0: &str, spec: &GenSpec, res_scale: Option<f32>) -> String {
    let c = spec.channels;
    let scale_name = res_scale.map(|s| b.scalar("res_scale", s));
    let mut x = x0.to_string();
    for i in 0..spec.blocks {
        let s = format!("/body/{i}");
        let h = b.conv(&format!("{s}/conv1"), &x, c, c, 3, Init::RELU.ghosted());
        let h = b.node(&s, "Relu", &[&h], vec![]);
        let mut h = b.conv(&format!("{s}/conv2"), &h, c, c, 3, Init::RESIDUAL.ghosted());
        if let Some(k) = &scale_name {
            h = b.node(&s, "Mul", &[&h, k], vec![]);
        }
        x = b.add(&s, &h, &x);
    }
    b.conv("/body_tail", &x, c, c, 3, Init::LINEAR.ghosted())
}

/// RDN-style body: residual dense blocks, then global feature fusion (Concat, 1x1, 3x3).
fn rdn_body(b: &mut Builder, x0: &str, spec: &GenSpec) -> String {
    let c = spec.channels;
    let g = (c / 2).max(1);
    let mut x = x0.to_string();
    let mut block_outputs = Vec::with_capacity(spec.blocks);
    for i in 0..spec.blocks {
        let s = format!("/body/{i}");
        let mut cat = x.clone();
        let mut cat_ch = c;
        for l in 0..RDN_LAYERS {
            let ls = format!("{s}/dense/{l}");
            let h = b.conv(&ls, &cat, cat_ch, g, 3, Init::RELU.ghosted());
            let h = b.node(&ls, "Relu", &[&h], vec![]);
            cat = b.node(&ls, "Concat", &[&cat, &h], vec![attr_int("axis", 1)]);
            cat_ch += g;
        }
        let fused = b.conv(&format!("{s}/lff"), &cat, cat_ch, c, 1, Init::RESIDUAL);
        x = b.add(&s, &fused, &x);
        block_outputs.push(x.clone());
    }
    let all = if block_outputs.len() == 1 {
        block_outputs.pop().expect("one block output")
    } else {
        let refs: Vec<&str> = block_outputs.iter().map(String::as_str).collect();
        b.node("/gff", "Concat", &refs, vec![attr_int("axis", 1)])
    };
    let y = b.conv("/gff/0", &all, c * spec.blocks, c, 1, Init::LINEAR);
    b.conv("/gff/1", &y, c, c, 3, Init::LINEAR.ghosted())
}

/// RCAN-style body: residual groups of residual channel-attention blocks, then a 3x3 conv.
fn rcan_body(b: &mut Builder, x0: &str, spec: &GenSpec) -> String {
    let c = spec.channels;
    let r = (c / RCAN_REDUCTION).max(1);
    let mut x = x0.to_string();
    for gi in 0..spec.blocks {
        let gs = format!("/body/{gi}");
        let group_in = x.clone();
        for bi in 0..RCAN_BLOCKS_PER_GROUP {
            let s = format!("{gs}/{bi}");
            let h = b.conv(&format!("{s}/conv1"), &x, c, c, 3, Init::RELU.ghosted());
            let h = b.node(&s, "Relu", &[&h], vec![]);
            let h = b.conv(&format!("{s}/conv2"), &h, c, c, 3, Init::RESIDUAL.ghosted());
            let ca = format!("{s}/ca");
            let p = b.node(&ca, "GlobalAveragePool", &[&h], vec![]);
            let p = b.conv(&format!("{ca}/down"), &p, c, r, 1, Init::RELU);
            let p = b.node(&ca, "Relu", &[&p], vec![]);
            let p = b.conv(&format!("{ca}/up"), &p, r, c, 1, Init::LINEAR);
            let p = b.node(&ca, "Sigmoid", &[&p], vec![]);
            let h = b.node(&ca, "Mul", &[&h, &p], vec![]);
            x = b.add(&s, &h, &x);
        }
        let t = b.conv(&format!("{gs}/tail"), &x, c, c, 3, Init::RESIDUAL.ghosted());
        x = b.add(&gs, &t, &group_in);
    }
    b.conv("/body_tail", &x, c, c, 3, Init::LINEAR.ghosted())
}

/// How a conv's weights are drawn.
#[derive(Debug, Clone, Copy)]
struct Init {
    /// Kaiming-uniform gain: weights ~ U(-b, b) with b = gain * sqrt(3 / fan_in).
    gain: f32,
    /// Plant ghost filters in this conv (3x3 body convs only).
    ghosts: bool,
}

impl Init {
    /// Conv followed by a ReLU.
    const RELU: Init = Init { gain: std::f32::consts::SQRT_2, ghosts: false };
    /// Conv with a linear output.
    const LINEAR: Init = Init { gain: 1.0, ghosts: false };
    /// Last conv of a residual branch: scaled down so deep stacks stay bounded.
    const RESIDUAL: Init = Init { gain: RESIDUAL_INIT_SCALE, ghosts: false };

    const fn ghosted(self) -> Init {
        Init { ghosts: true, ..self }
    }
}

/// The 8 one-tap shifts (dy, dx) a planted ghost filter may use.
const SHIFTS: [(isize, isize); 8] = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)];

/// A tiny append-only graph builder: nodes are added in topological order.
struct Builder {
    rng: Xoshiro256PlusPlus,
    planted_ghosts: f32,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
}

impl Builder {
    fn new(seed: u64, planted_ghosts: f32) -> Builder {
        Builder {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            planted_ghosts,
            nodes: Vec::new(),
            initializers: Vec::new(),
            names: HashSet::from(["input".to_string(), "output".to_string()]),
        }
    }

    /// Reserves a tensor or node name; a clash is a bug in this module.
    fn claim(&mut self, name: &str) {
        assert!(self.names.insert(name.to_string()), "duplicate name {name:?}");
    }

    /// Adds node `{scope}/{op}` with output `{scope}/{op}_output_0`, returning the output name.
    fn node(&mut self, scope: &str, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        let name = format!("{scope}/{op}");
        let output = format!("{name}_output_0");
        self.claim(&name);
        self.claim(&output);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: Some(name),
            op_type: Some(op.to_string()),
            domain: Some(String::new()),
            attribute,
            ..Default::default()
        });
        output
    }

    fn add(&mut self, scope: &str, a: &str, b: &str) -> String {
        self.node(scope, "Add", &[a, b], vec![])
    }

    fn initializer(&mut self, name: &str, dims: &[usize], data: &[f32]) {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        self.claim(name);
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(DataType::Float as i32),
            name: Some(name.to_string()),
            raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
    }

    /// A rank-0 float initializer, returning its name.
    fn scalar(&mut self, name: &str, value: f32) -> String {
        self.initializer(name, &[], &[value]);
        name.to_string()
    }

    /// Adds a `cin -> cout`, `k x k` (stride 1, same padding) Conv with weights `{p}.weight` and
    /// `{p}.bias`, where `p` is `scope` with '/' as '.' (`/body/3/conv1` -> `body.3.conv1`).
    fn conv(&mut self, scope: &str, input: &str, cin: usize, cout: usize, k: usize, init: Init) -> String {
        let fan_in = cin * k * k;
        let bound = init.gain * (3.0 / fan_in as f32).sqrt();
        let bias_bound = 0.1 / (fan_in as f32).sqrt();
        let mut w: Vec<f32> = (0..cout * fan_in).map(|_| self.rng.gen_range(-bound..bound)).collect();
        let mut bias: Vec<f32> = (0..cout).map(|_| self.rng.gen_range(-bias_bound..bias_bound)).collect();
        if init.ghosts && k == 3 && self.planted_ghosts > 0.0 {
            self.plant_ghosts(&mut w, &mut bias, cout, cin, bound);
        }

        let p = scope.trim_start_matches('/').replace('/', ".");
        let (wn, bn) = (format!("{p}.weight"), format!("{p}.bias"));
        self.initializer(&wn, &[cout, cin, k, k], &w);
        self.initializer(&bn, &[cout], &bias);
        let pad = (k / 2) as i64;
        let k = k as i64;
        self.node(
            scope,
            "Conv",
            &[input, &wn, &bn],
            vec![
                attr_ints("dilations", &[1, 1]),
                attr_int("group", 1),
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("pads", &[pad, pad, pad, pad]),
                attr_ints("strides", &[1, 1]),
            ],
        )
    }

    /// Overwrites `floor(planted_ghosts * cout)` filters of a 3x3 conv (`w` is `[cout][cin][3][3]`)
    /// with a copy of a randomly chosen non-ghost ("primary") filter whose kernel is shifted by
    /// one tap `(dy, dx)` (one of the 8 neighbours) with zero fill, plus uniform noise; the bias
    /// is copied. The primary's taps that the shift would push out of the kernel are zeroed first,
    /// so the shift loses nothing: the ghost's output is the primary's output shifted,
    /// `g(y, x) = f(y + dy, x + dx)`, up to the noise and the image border.
    fn plant_ghosts(&mut self, w: &mut [f32], bias: &mut [f32], cout: usize, cin: usize, bound: f32) {
        let n_ghosts = ((self.planted_ghosts * cout as f32).floor() as usize).min(cout - 1);
        if n_ghosts == 0 {
            return;
        }
        let mut order: Vec<usize> = (0..cout).collect();
        order.shuffle(&mut self.rng);
        let (ghosts, primaries) = order.split_at(n_ghosts);
        let plan: Vec<(usize, usize, (isize, isize))> = ghosts
            .iter()
            .map(|&g| {
                let src = primaries[self.rng.gen_range(0..primaries.len())];
                (g, src, SHIFTS[self.rng.gen_range(0..SHIFTS.len())])
            })
            .collect();
        let filter = cin * 9;
        let in_kernel = |v: isize| (0..3).contains(&v);
        // First zero every primary tap that one of its ghosts' shifts would drop...
        for &(_, src, (dy, dx)) in &plan {
            for ci in 0..cin {
                for y in 0..3isize {
                    for x in 0..3isize {
                        if !in_kernel(y + dy) || !in_kernel(x + dx) {
                            w[src * filter + ci * 9 + (y * 3 + x) as usize] = 0.0;
                        }
                    }
                }
            }
        }
        // ...then copy the shifted primaries, so every ghost is an exact shift of its primary.
        let noise = GHOST_NOISE * bound;
        for &(g, src, (dy, dx)) in &plan {
            for ci in 0..cin {
                for y in 0..3isize {
                    for x in 0..3isize {
                        let (sy, sx) = (y - dy, x - dx);
                        let v = if in_kernel(sy) && in_kernel(sx) {
                            w[src * filter + ci * 9 + (sy * 3 + sx) as usize]
                        } else {
                            0.0
                        };
                        let n = self.rng.gen_range(-noise..=noise);
                        w[g * filter + ci * 9 + (y * 3 + x) as usize] = v + n;
                    }
                }
            }
            bias[g] = bias[src];
        }
    }

    /// Renames the last node's output to `output` and wraps everything in a ModelProto.
    fn finish(mut self, spec: &GenSpec, last: &str) -> ModelProto {
        let node = self.nodes.last_mut().expect("graph has nodes");
        assert_eq!(node.output[0], last, "the last node must produce the output");
        node.output[0] = "output".to_string();

        let (n, h, w) = (dim_param("n"), dim_param("h"), dim_param("w"));
        let graph = GraphProto {
            node: self.nodes,
            name: Some(spec.graph_name()),
            initializer: self.initializers,
            input: vec![tensor_value_info("input", vec![n.clone(), dim_value(3), h, w])],
            output: vec![tensor_value_info("output", vec![n, dim_value(3), dim_unknown(), dim_unknown()])],
            ..Default::default()
        };
        let meta = |k: &str, v: String| StringStringEntryProto {
            key: Some(format!("ghostsr.generate.{k}")),
            value: Some(v),
        };
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
            producer_name: Some(PRODUCER_NAME.to_string()),
            producer_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            doc_string: Some(format!(
                "Synthetic {} x{} super-resolution model ({} blocks, {} channels, seed {}, planted ghosts {}) \
                 generated by ghostsr; the weights are random, not trained.",
                spec.arch, spec.scale, spec.blocks, spec.channels, spec.seed, spec.planted_ghosts
            )),
            graph: Some(graph),
            metadata_props: vec![
                meta("arch", spec.arch.name().to_string()),
                meta("scale", spec.scale.to_string()),
                meta("blocks", spec.blocks.to_string()),
                meta("channels", spec.channels.to_string()),
                meta("seed", spec.seed.to_string()),
                meta("planted_ghosts", spec.planted_ghosts.to_string()),
            ],
            ..Default::default()
        }
    }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(i),
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Ints as i32),
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_str(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::String as i32),
        s: Some(s.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn dim_param(p: &str) -> tensor_shape_proto::Dimension {
    tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimParam(p.to_string())),
        ..Default::default()
    }
}

fn dim_value(v: i64) -> tensor_shape_proto::Dimension {
    tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimValue(v)),
        ..Default::default()
    }
}

fn dim_unknown() -> tensor_shape_proto::Dimension {
    tensor_shape_proto::Dimension::default()
}

fn tensor_value_info(name: &str, dims: Vec<tensor_shape_proto::Dimension>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Learnable parameters of a generated model: the elements of its float initializers of rank at
/// least 1 (conv weights and biases; the rank-0 residual-scale constant is not a parameter).
fn weight_count(model: &ModelProto) -> u64 {
    let Some(graph) = &model.graph else { return 0 };
    graph
        .initializer
        .iter()
        .filter(|t| t.data_type == Some(DataType::Float as i32) && !t.dims.is_empty())
        .map(|t| t.dims.iter().product::<i64>() as u64)
        .sum()
}

/// Write a synthetic super-resolution ONNX model (EDSR, EDSR-baseline, RDN- or RCAN-style) with
/// seeded random weights.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Architecture family of the model.
    #[arg(value_enum)]
    pub arch: Arch,

    /// Upscaling factor: 2 or 3 (one Conv + DepthToSpace) or 4 (two x2 stages).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=4))]
    pub scale: u32,

    /// Body depth, overriding the preset: residual blocks (edsr 32, edsr-baseline 16), residual
    /// dense blocks (rdn 4) or residual groups of 4 attention blocks (rcan 2).
    #[arg(long, value_name = "N")]
    pub blocks: Option<usize>,

    /// Feature channels, overriding the preset (edsr 256; edsr-baseline, rdn and rcan 64).
    #[arg(long, value_name = "C")]
    pub channels: Option<usize>,

    /// Seed of the random weights; the same options always give the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Fraction in [0, 1) of the filters of every 3x3 body conv to plant as shifted copies of
    /// other filters of the same conv (plus small noise), so a ghost planner has redundancy to
    /// find. 0 plants none.
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    pub planted_ghosts: f32,

    /// Where to write the .onnx file.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,

    /// Overwrite the output file if it already exists.
    #[arg(long)]
    pub force: bool,
}

impl GenerateArgs {
    /// The spec these options describe: the preset of `arch` at `scale` with the overrides applied.
    pub fn spec(&self) -> GenSpec {
        let mut spec = GenSpec::preset(self.arch, self.scale);
        if let Some(blocks) = self.blocks {
            spec.blocks = blocks;
        }
        if let Some(channels) = self.channels {
            spec.channels = channels;
        }
        spec.seed = self.seed;
        spec.planted_ghosts = self.planted_ghosts;
        spec
    }
}

/// Runs `ghostsr generate`: builds the model, writes it to a temporary file beside the output and
/// renames it into place (refusing to replace an existing file without `--force`), then prints a
/// one-line summary.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let spec = args.spec();
    spec.validate()?;
    let path = &args.output;
    if !args.force && path.exists() {
        bail!("{} already exists; pass --force to overwrite it", path.display());
    }
    let model = generate(&spec);
    let bytes = model.encode_to_vec();
    if bytes.len() > MAX_MODEL_BYTES {
        bail!(
            "the model would be {} bytes, over protobuf's 2 GiB limit; use fewer blocks or channels",
            bytes.len()
        );
    }
    write_atomically(path, &bytes)?;
    println!(
        "generated {} x{} ({} blocks, {} channels, seed {}, planted ghosts {}): {} params -> {}",
        spec.arch,
        spec.scale,
        spec.blocks,
        spec.channels,
        spec.seed,
        spec.planted_ghosts,
        crate::report::thousands(weight_count(&model)),
        path.display()
    );
    Ok(())
}

/// Writes `bytes` to a temporary file in the directory of `path`, then renames it to `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let file_name =
        path.file_name().with_context(|| format!("output path {} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(arch: Arch, scale: u32) -> GenSpec {
        GenSpec { blocks: 2, channels: 16, seed: 7, ..GenSpec::preset(arch, scale) }
    }

    const ARCHS: [Arch; 4] = [Arch::Edsr, Arch::EdsrBaseline, Arch::Rdn, Arch::Rcan];

    fn floats(t: &TensorProto) -> Vec<f32> {
        t.raw_data
            .as_ref()
            .expect("raw_data")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn generate_is_deterministic() {
        for arch in ARCHS {
            let mut spec = small(arch, 4);
            spec.planted_ghosts = 0.5;
            let a = generate(&spec).encode_to_vec();
            let b = generate(&spec).encode_to_vec();
            assert_eq!(a, b, "{arch}");
            spec.seed += 1;
            assert_ne!(a, generate(&spec).encode_to_vec(), "{arch}: seed must matter");
        }
    }

    #[test]
    fn generate_edsr_x2_preset_has_40_729_603_params() {
        let model = generate(&GenSpec::preset(Arch::Edsr, 2));
        assert_eq!(weight_count(&model), 40_729_603);
        // The only other initializer is the shared rank-0 residual scale.
        let g = model.graph.as_ref().unwrap();
        let scalars: Vec<_> = g.initializer.iter().filter(|t| t.dims.is_empty()).collect();
        assert_eq!(scalars.len(), 1);
        assert_eq!(floats(scalars[0]), vec![EDSR_RES_SCALE]);
    }

    #[test]
    fn generate_preset_param_counts() {
        let count = |arch, scale| weight_count(&generate(&GenSpec::preset(arch, scale)));
        assert_eq!(count(Arch::EdsrBaseline, 2), 1_369_859);
        assert_eq!(count(Arch::EdsrBaseline, 3), 1_554_499);
        assert_eq!(count(Arch::EdsrBaseline, 4), 1_517_571);
        assert_eq!(count(Arch::Rdn, 2), 770_627);
        assert_eq!(count(Arch::Rdn, 3), 955_267);
        assert_eq!(count(Arch::Rdn, 4), 918_339);
        assert_eq!(count(Arch::Rcan, 2), 857_507);
        assert_eq!(count(Arch::Rcan, 3), 1_042_147);
        assert_eq!(count(Arch::Rcan, 4), 1_005_219);
    }

    #[test]
    fn generate_graphs_are_topological_with_unique_names() {
        for arch in ARCHS {
            for scale in [2, 3, 4] {
                let model = generate(&small(arch, scale));
                assert_eq!(model.ir_version, Some(IR_VERSION));
                assert_eq!(model.opset_import[0].version, Some(OPSET));
                let g = model.graph.as_ref().unwrap();
                let mut available: HashSet<&str> = HashSet::new();
                let mut tensor_names: HashSet<&str> = HashSet::new();
                for t in &g.initializer {
                    let n = t.name.as_deref().unwrap();
                    assert!(tensor_names.insert(n), "{arch} x{scale}: duplicate tensor {n}");
                    available.insert(n);
                }
                assert_eq!(g.input.len(), 1);
                assert!(tensor_names.insert("input"));
                available.insert("input");
                let mut node_names = HashSet::new();
                for node in &g.node {
                    let name = node.name.as_deref().unwrap();
                    assert!(node_names.insert(name), "{arch} x{scale}: duplicate node {name}");
                    for i in &node.input {
                        assert!(
                            available.contains(i.as_str()),
                            "{arch} x{scale}: {name} reads {i} before it is produced"
                        );
                    }
                    for o in &node.output {
                        assert!(tensor_names.insert(o), "{arch} x{scale}: duplicate tensor {o}");
                        available.insert(o);
                    }
                }
                assert_eq!(g.output[0].name.as_deref(), Some("output"));
                assert!(available.contains("output"));
                let d2s = g.node.iter().filter(|n| n.op_type.as_deref() == Some("DepthToSpace")).count();
                assert_eq!(d2s, if scale == 4 { 2 } else { 1 });
            }
        }
    }

    #[test]
    fn generate_convs_have_explicit_attributes() {
        for arch in ARCHS {
            let model = generate(&small(arch, 2));
            for node in &model.graph.as_ref().unwrap().node {
                if node.op_type.as_deref() != Some("Conv") {
                    continue;
                }
                let mut names: Vec<&str> =
                    node.attribute.iter().map(|a| a.name.as_deref().unwrap()).collect();
                names.sort_unstable();
                assert_eq!(names, ["dilations", "group", "kernel_shape", "pads", "strides"]);
                assert_eq!(node.input.len(), 3, "{:?}", node.name);
            }
        }
    }

    /// How many filters of the 3x3 conv `weight` are a one-tap shifted copy of another filter
    /// of the same conv, up to the planting noise.
    fn shifted_copies(model: &ModelProto, weight: &str) -> usize {
        let w = model
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some(weight))
            .unwrap();
        let (cout, cin) = (w.dims[0] as usize, w.dims[1] as usize);
        let w = floats(w);
        let filter = |o: usize| &w[o * cin * 9..(o + 1) * cin * 9];
        let bound = std::f32::consts::SQRT_2 * (3.0 / (cin * 9) as f32).sqrt();
        let tol = GHOST_NOISE * bound * 1.001;
        let is_shift_of = |gf: &[f32], pf: &[f32], (dy, dx): (isize, isize)| {
            (0..cin).all(|ci| {
                (0..3isize).all(|y| {
                    (0..3isize).all(|x| {
                        let (sy, sx) = (y - dy, x - dx);
                        let v = if (0..3).contains(&sy) && (0..3).contains(&sx) {
                            pf[ci * 9 + (sy * 3 + sx) as usize]
                        } else {
                            0.0
                        };
                        (gf[ci * 9 + (y * 3 + x) as usize] - v).abs() <= tol
                    })
                })
            })
        };
        (0..cout)
            .filter(|&o| {
                (0..cout).any(|p| p != o && SHIFTS.iter().any(|&d| is_shift_of(filter(o), filter(p), d)))
            })
            .count()
    }

    #[test]
    fn generate_plants_shifted_ghost_filters() {
        let spec = GenSpec { planted_ghosts: 0.5, ..small(Arch::EdsrBaseline, 2) };
        let planted = generate(&spec);
        // Ghosts are shifted primaries, and (their dropped taps being zero) primaries are
        // shifted ghosts too: at least every ghost, at most every filter, has a partner.
        let n = shifted_copies(&planted, "body.0.conv1.weight");
        assert!((spec.channels / 2..=spec.channels).contains(&n), "{n}");
        let plain = generate(&small(Arch::EdsrBaseline, 2));
        assert_eq!(shifted_copies(&plain, "body.0.conv1.weight"), 0);
        // Planting changes values, not structure; 1x1 convs and the head are never planted.
        let names = |m: &ModelProto| -> Vec<String> {
            m.graph.as_ref().unwrap().initializer.iter().map(|t| t.name.clone().unwrap()).collect()
        };
        assert_eq!(names(&planted), names(&plain));
        let head = |m: &ModelProto| m.graph.as_ref().unwrap().initializer[0].clone();
        assert_eq!(head(&planted), head(&plain));
    }

    #[test]
    fn generate_spec_validation() {
        assert!(GenSpec::preset(Arch::Rcan, 3).validate().is_ok());
        assert!(GenSpec::preset(Arch::Edsr, 5).validate().is_err());
        assert!(GenSpec { blocks: 0, ..GenSpec::preset(Arch::Rdn, 2) }.validate().is_err());
        let ghosts = |f| GenSpec { planted_ghosts: f, ..GenSpec::preset(Arch::Edsr, 2) };
        assert!(ghosts(1.0).validate().is_err());
        assert!(ghosts(-0.1).validate().is_err());
        assert!(ghosts(f32::NAN).validate().is_err());
        assert!(ghosts(0.9).validate().is_ok());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn parse(argv: &[&str]) -> Result<GenerateArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("generate").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn generate_args_parse_and_override_the_preset() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let a = parse(&["edsr-baseline", "-o", "m.onnx"]).unwrap();
        assert_eq!(a.spec(), GenSpec::preset(Arch::EdsrBaseline, 2));
        let a = parse(&[
            "rcan",
            "--scale",
            "4",
            "--blocks",
            "3",
            "--channels",
            "32",
            "--seed",
            "9",
            "--planted-ghosts",
            "0.25",
            "--output",
            "m.onnx",
            "--force",
        ])
        .unwrap();
        assert!(a.force);
        assert_eq!(
            a.spec(),
            GenSpec { arch: Arch::Rcan, scale: 4, blocks: 3, channels: 32, seed: 9, planted_ghosts: 0.25 }
        );
        assert!(parse(&["edsr", "--scale", "5", "-o", "m.onnx"]).is_err());
        assert!(parse(&["edsr"]).is_err(), "the output path is required");
    }

    #[test]
    fn generate_run_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let mut args = parse(&["edsr-baseline", "--blocks", "1", "--channels", "8", "-o", "x"]).unwrap();
        args.output = path.clone();
        run(&args).unwrap();
        let first = std::fs::read(&path).unwrap();
        assert_eq!(first, generate(&args.spec()).encode_to_vec());

        args.seed = 1;
        let err = run(&args).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("--force"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), first);

        args.force = true;
        run(&args).unwrap();
        assert_ne!(std::fs::read(&path).unwrap(), first);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
