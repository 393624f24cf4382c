//! Half precision around the emitters: analysis, planning and emitting work on float32 weights,
//! so a float16 model is widened first ([`to_f32`], exact) and the ghost model is narrowed back
//! ([`to_f16`], round to nearest even) — for a float16 input automatically, for a float32 one
//! with `convert --fp16` (GPU deployments in half precision). The reduced Convs keep a subset of
//! the original filters, so for a float16 input they come back bit for bit; GhostShift's scale
//! and bias attributes are float32 in both precisions (its float16 kernels compute in f32).
//!
//! What changes: float initializers, `Constant` values, graph inputs, outputs and value_info,
//! and `Cast` targets. What stays float32: inputs that ONNX requires to be float whatever the
//! data type (`Resize`'s roi and scales, `Upsample`'s scales), found by their consumers.

use std::collections::HashSet;

use anyhow::{Context, Result, bail};
use half::f16;

use crate::onnx::{self, AttributeProto, GraphProto, ModelProto, TensorProto, ValueInfoProto, type_proto};

const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;

/// Whether the model computes in float16: a float16 graph input or float16 initializer.
pub fn is_fp16(model: &ModelProto) -> bool {
    let Some(g) = model.graph.as_ref() else { return false };
    g.input.iter().any(|v| elem_type(v) == Some(FLOAT16))
        || g.initializer.iter().any(|t| t.data_type == Some(FLOAT16))
}

/// The float16 model as float32 (exact).
pub fn to_f32(model: &ModelProto) -> Result<ModelProto> {
    convert(model, FLOAT16, FLOAT)
}

/// The float32 model as float16 (round to nearest even); values beyond float16's range are an
/// error naming the tensor, not a silent infinity.
pub fn to_f16(model: &ModelProto) -> Result<ModelProto> {
    convert(model, FLOAT, FLOAT16)
}

/// Widens a loaded float16 model in place (analysis, planning and emitting read float32
/// weights); returns whether it was float16. The model's file hash is unchanged, so plans made
/// on the widened model fit the float16 file.
///
/// Only a model that narrows back to itself is widened: one that mixes float16 and float32 on
/// purpose (a Cast to float32, float32 outputs) would come back all float16, so it is left as
/// it is (its float16 Convs are then not planned) and an empty plan still returns it unchanged.
pub fn widen(m: &mut crate::model::Model) -> Result<bool> {
    if !is_fp16(&m.proto) {
        return Ok(false);
    }
    let wide = to_f32(&m.proto).with_context(|| format!("widening {} to float32", m.path.display()))?;
    if to_f16(&wide).ok().as_ref() != Some(&m.proto) {
        eprintln!(
            "ghostsr: note: {} mixes float16 and float32; it is rewritten as it is (its float16 Convs are not ghosted)",
            m.path.display()
        );
        return Ok(false);
    }
    m.proto = wide;
    Ok(true)
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}

fn set_elem_type(v: &mut ValueInfoProto, from: i32, to: i32) {
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
        && t.elem_type == Some(from)
    {
        t.elem_type = Some(to);
    }
}

fn convert(model: &ModelProto, from: i32, to: i32) -> Result<ModelProto> {
    let mut out = model.clone();
    let Some(g) = out.graph.as_mut() else { bail!("the model has no graph") };
    convert_graph(g, from, to)?;
    Ok(out)
}

/// Tensors that must stay float32: Resize roi/scales, Upsample scales.
fn float_only_inputs(g: &GraphProto) -> HashSet<String> {
    let mut keep = HashSet::new();
    for n in &g.node {
        let positions: &[usize] =
            match (n.domain.as_deref().unwrap_or(""), n.op_type.as_deref().unwrap_or("")) {
                ("", "Resize") => &[1, 2],
                ("", "Upsample") => &[1],
                _ => &[],
            };
        for &i in positions {
            if let Some(name) = n.input.get(i).filter(|s| !s.is_empty()) {
                keep.insert(name.clone());
            }
        }
    }
    keep
}

fn convert_graph(g: &mut GraphProto, from: i32, to: i32) -> Result<()> {
    let keep = float_only_inputs(g);
    for t in &mut g.initializer {
        if !keep.contains(t.name.as_deref().unwrap_or("")) {
            convert_tensor(t, from, to)?;
        }
    }
    for v in g.input.iter_mut().chain(&mut g.output).chain(&mut g.value_info) {
        if !keep.contains(v.name.as_deref().unwrap_or("")) {
            set_elem_type(v, from, to);
        }
    }
    for n in &mut g.node {
        let op = n.op_type.as_deref().unwrap_or("");
        let is_default = n.domain.as_deref().unwrap_or("").is_empty();
        let output_kept = n.output.iter().any(|o| keep.contains(o));
        for a in &mut n.attribute {
            convert_attr(a, op, is_default, output_kept, from, to)?;
        }
    }
    Ok(())
}

fn convert_attr(
    a: &mut AttributeProto,
    op: &str,
    is_default: bool,
    output_kept: bool,
    from: i32,
    to: i32,
) -> Result<()> {
    let name = a.name.as_deref().unwrap_or("");
    if is_default && op == "Cast" && name == "to" && a.i == Some(i64::from(from)) {
        a.i = Some(i64::from(to));
    }
    if is_default
        && op == "Constant"
        && !output_kept
        && let Some(t) = a.t.as_mut()
    {
        convert_tensor(t, from, to)?;
    }
    if let Some(g) = a.g.as_mut() {
        convert_graph(g, from, to)?;
    }
    for g in &mut a.graphs {
        convert_graph(g, from, to)?;
    }
    Ok(())
}

fn convert_tensor(t: &mut TensorProto, from: i32, to: i32) -> Result<()> {
    if t.data_type != Some(from) {
        return Ok(());
    }
    let name = t.name.clone().unwrap_or_default();
    let raw: Vec<u8> = if from == FLOAT {
        let v = onnx::tensor_f32(t)?;
        let mut raw = Vec::with_capacity(v.len() * 2);
        for x in v {
            let h = f16::from_f32(x);
            if h.is_infinite() && x.is_finite() {
                bail!(
                    "initializer '{name}': {x} is beyond float16's range (±65504); keep this model in float32"
                );
            }
            raw.extend(h.to_le_bytes());
        }
        raw
    } else {
        let bits: Vec<u16> = match &t.raw_data {
            Some(raw) => raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect(),
            // float16 values live in int32_data, one per element, in the low 16 bits.
            None => t.int32_data.iter().map(|&v| v as u16).collect(),
        };
        bits.iter().flat_map(|&b| f16::from_bits(b).to_f32().to_le_bytes()).collect()
    };
    t.raw_data = Some(raw);
    t.float_data.clear();
    t.int32_data.clear();
    t.data_type = Some(to);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{NodeProto, attr_floats_of};

    fn model() -> ModelProto {
        let w = onnx::f32_tensor("w", &[2, 1, 1, 1], &[0.5, -1.25]);
        let scales = onnx::f32_tensor("scales", &[4], &[1.0, 1.0, 2.0, 2.0]);
        let conv = NodeProto {
            op_type: Some("Conv".into()),
            input: vec!["x".into(), "w".into()],
            output: vec!["c".into()],
            ..Default::default()
        };
        let resize = NodeProto {
            op_type: Some("Resize".into()),
            input: vec!["c".into(), String::new(), "scales".into()],
            output: vec!["y".into()],
            ..Default::default()
        };
        let ghost = NodeProto {
            op_type: Some("GhostShift".into()),
            domain: Some("ai.ghostsr".into()),
            input: vec!["y".into()],
            output: vec!["z".into()],
            attribute: vec![attr_floats_of("scales", vec![0.1])],
            ..Default::default()
        };
        ModelProto {
            graph: Some(GraphProto {
                node: vec![conv, resize, ghost],
                initializer: vec![w, scales],
                input: vec![onnx::value_info_nchw("x", [Some(1), Some(1), Some(2), Some(2)])],
                output: vec![onnx::value_info_nchw("z", [Some(1), Some(1), Some(4), Some(4)])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn narrows_data_and_keeps_float_only_inputs() {
        let m = model();
        assert!(!is_fp16(&m));
        let h = to_f16(&m).expect("to f16");
        assert!(is_fp16(&h));
        let g = h.graph.as_ref().expect("graph");
        assert_eq!(g.initializer[0].data_type, Some(FLOAT16));
        assert_eq!(g.initializer[0].raw_data.as_deref(), Some(&[0x00, 0x38, 0x00, 0xbd][..]));
        assert_eq!(g.initializer[1].data_type, Some(FLOAT), "Resize scales stay float32");
        assert_eq!(elem_type(&g.input[0]), Some(FLOAT16));
        assert_eq!(elem_type(&g.output[0]), Some(FLOAT16));
        assert_eq!(g.node[2].attribute[0].floats, vec![0.1], "GhostShift attributes are float32");
        let back = to_f32(&h).expect("to f32");
        assert_eq!(back, m, "float16-exact values round trip");
    }

    #[test]
    fn only_models_that_narrow_back_to_themselves_are_widened() {
        let half = to_f16(&model()).expect("to f16");
        let mut pure =
            crate::model::Model { proto: half.clone(), path: "h.onnx".into(), sha256: String::new() };
        assert!(widen(&mut pure).expect("widen"), "a float16 model is widened");
        assert_eq!(to_f16(&pure.proto).expect("narrow"), half);
        // A float32 graph output next to float16 data: narrowing all would change the model.
        let mut mixed_proto = half;
        let g = mixed_proto.graph.as_mut().expect("graph");
        set_elem_type(&mut g.output[0], FLOAT16, FLOAT);
        let mut mixed =
            crate::model::Model { proto: mixed_proto.clone(), path: "m.onnx".into(), sha256: String::new() };
        assert!(!widen(&mut mixed).expect("widen"), "a mixed model is left as it is");
        assert_eq!(mixed.proto, mixed_proto);
    }

    #[test]
    fn out_of_range_values_are_errors() {
        let mut m = model();
        m.graph.as_mut().expect("graph").initializer[0] = onnx::f32_tensor("w", &[2, 1, 1, 1], &[1e6, 0.0]);
        let e = format!("{:#}", to_f16(&m).unwrap_err());
        assert!(e.contains("initializer 'w'") && e.contains("float16"), "{e}");
    }
}
