//! Feature capture: run a model in ONNX Runtime (CPU) with extra graph outputs and collect
//! named intermediate tensors over the calibration crops.
//!
//! Extra outputs are added as `ValueInfoProto` graph outputs before the model is encoded and
//! committed from memory. For a partly ghosted model this is also what keeps names stable: the
//! emitter restores every graph output to its original name and channel order (a Gather where
//! a ghost layer permuted it), so a Conv input or output named by the ORIGINAL model reads the
//! same tensor, in the original layout, in the ghosted one. Sessions get flush-to-zero /
//! denormals-as-zero like the runner's.

use anyhow::{Context, Result, bail, ensure};
use ort::session::Session;
use ort::value::TensorRef;

use super::fit::Maps;
use crate::onnx::{self, ModelProto};
use crate::runner::session::{environment, ort_err};
use crate::runner::sr::Chw;

/// The model's data input: the first graph input that is not an initializer.
pub fn input_name(proto: &ModelProto) -> Result<String> {
    let g = proto.graph.as_ref().context("the model has no graph")?;
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(onnx::tensor_name).collect();
    g.input
        .iter()
        .filter_map(|v| v.name.as_deref())
        .find(|n| !inits.contains(n))
        .map(str::to_string)
        .context("the model has no data input")
}

/// A copy of `proto` that also outputs `names` (those already graph outputs or the data input
/// are left alone).
pub fn with_outputs(proto: &ModelProto, names: &[String]) -> Result<ModelProto> {
    let mut p = proto.clone();
    let input = input_name(proto)?;
    let g = p.graph.as_mut().context("the model has no graph")?;
    for n in names {
        if *n != input && !g.output.iter().any(|o| o.name.as_deref() == Some(n.as_str())) {
            g.output.push(onnx::value_info_nchw(n, [None; 4]));
        }
    }
    Ok(p)
}

/// Keeps only what computing `names` needs: their graph outputs, the nodes they depend on and
/// the initializers those read (a capture near the input runs a fraction of the network).
pub fn prune_to(proto: &ModelProto, names: &[String]) -> Result<ModelProto> {
    let mut p = proto.clone();
    let g = p.graph.as_mut().context("the model has no graph")?;
    let mut needed: std::collections::HashSet<String> = names.iter().cloned().collect();
    let mut keep = vec![false; g.node.len()];
    for (i, n) in g.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let mut k = keep.iter();
    g.node.retain(|_| *k.next().unwrap_or(&false));
    g.output.retain(|o| o.name.as_ref().is_some_and(|n| names.contains(n)));
    for n in names {
        if !g.output.iter().any(|o| o.name.as_deref() == Some(n.as_str())) {
            g.output.push(onnx::value_info_nchw(n, [None; 4]));
        }
    }
    g.initializer.retain(|t| needed.contains(onnx::tensor_name(t)));
    // Initializers listed as graph inputs (older exporters) go with them; the data input stays.
    let data = input_name(proto)?;
    g.input.retain(|v| v.name.as_ref().is_some_and(|n| *n == data || needed.contains(n)));
    Ok(p)
}

/// An ONNX Runtime CPU session on `proto` (`threads` intra-op threads, 0: ORT's default).
pub fn open(proto: &ModelProto, threads: usize) -> Result<Session> {
    let env = environment()?;
    let bytes = crate::model::encode(proto);
    crate::runner::session::base_builder(env, threads)?
        .commit_from_memory(&bytes)
        .map_err(ort_err)
        .context("loading the calibration model into ONNX Runtime")
}

/// Runs `session` on every crop and returns each named tensor stacked over the crops
/// (`[crops, C, H, W]`). A name equal to the data input `input` reads the crops themselves.
pub fn run(session: &mut Session, input: &str, crops: &[Chw], names: &[String]) -> Result<Vec<Maps>> {
    let mut out: Vec<Option<Maps>> = vec![None; names.len()];
    for (k, x) in crops.iter().enumerate() {
        let shape = [1usize, x.channels, x.height, x.width];
        let tensor = TensorRef::from_array_view((shape, &x.data[..])).map_err(ort_err)?;
        let outputs =
            session.run(ort::inputs![tensor]).map_err(ort_err).context("running the calibration model")?;
        for (i, name) in names.iter().enumerate() {
            let (dims, data): (Vec<usize>, &[f32]) = if name == input {
                (shape.to_vec(), &x.data[..])
            } else {
                let v = outputs.get(name.as_str()).with_context(|| format!("no output '{name}'"))?;
                let (s, d) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
                (s.iter().map(|&v| v as usize).collect(), d)
            };
            stack(&mut out[i], name, &dims, data, k)?;
        }
    }
    out.into_iter().map(|m| m.context("no calibration crops")).collect()
}

/// Appends crop `k`'s value of output `name` (`dims`, `[1, C, H, W]`) to its stack over the crops.
fn stack(out: &mut Option<Maps>, name: &str, dims: &[usize], data: &[f32], k: usize) -> Result<()> {
    ensure!(dims.len() == 4 && dims[0] == 1, "tensor '{name}' has shape {dims:?}, expected [1, C, H, W]");
    let m = out.get_or_insert_with(|| Maps { n: 0, c: dims[1], h: dims[2], w: dims[3], data: vec![] });
    if (m.c, m.h, m.w) != (dims[1], dims[2], dims[3]) {
        bail!("tensor '{name}' changes shape between crops");
    }
    m.data.extend_from_slice(data);
    m.n = k + 1;
    Ok(())
}

/// Keeps only what computing `names` needs when the tensors in `stops` are given: like
/// [`prune_to`], but the walk back ends at a stop, which becomes a graph input (float NCHW).
/// Returns the model and the stops it reads, its inputs. (Calibration runs only the part of the
/// network after the layer it decides, from features it kept of the state before.)
pub fn prune_from(
    proto: &ModelProto,
    names: &[String],
    stops: &std::collections::HashSet<String>,
) -> Result<(ModelProto, Vec<String>)> {
    let data = input_name(proto)?;
    let mut p = proto.clone();
    let g = p.graph.as_mut().context("the model has no graph")?;
    let mut needed: std::collections::HashSet<String> = names.iter().cloned().collect();
    let mut produced: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut keep = vec![false; g.node.len()];
    for (i, n) in g.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o) && !stops.contains(o)) {
            keep[i] = true;
            produced.extend(n.output.iter().cloned());
            needed.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let mut k = keep.iter();
    g.node.retain(|_| *k.next().unwrap_or(&false));
    let mut inputs: Vec<String> =
        stops.iter().filter(|s| needed.contains(*s) && !produced.contains(*s)).cloned().collect();
    inputs.sort();
    let data_vi = g.input.iter().find(|v| v.name.as_deref() == Some(data.as_str())).cloned();
    g.input = inputs
        .iter()
        .map(|n| match &data_vi {
            Some(vi) if *n == data => vi.clone(),
            _ => onnx::value_info_nchw(n, [None; 4]),
        })
        .collect();
    g.output = names.iter().map(|n| onnx::value_info_nchw(n, [None; 4])).collect();
    g.initializer.retain(|t| {
        needed.contains(onnx::tensor_name(t)) && !inputs.iter().any(|i| i == onnx::tensor_name(t))
    });
    Ok((p, inputs))
}

/// Runs `session` once per crop, feeding crop `k` of each `feeds` tensor (`[crops, C, H, W]`,
/// by graph input name), and returns each named output stacked over the crops.
pub fn run_fed(session: &mut Session, feeds: &[(&str, &Maps)], names: &[String]) -> Result<Vec<Maps>> {
    let n = feeds.first().map(|(_, m)| m.n).context("no inputs to feed")?;
    ensure!(feeds.iter().all(|(_, m)| m.n == n), "fed tensors differ in crop count");
    let mut out: Vec<Option<Maps>> = vec![None; names.len()];
    for k in 0..n {
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(feeds.len());
        for (name, m) in feeds {
            let len = m.c * m.h * m.w;
            let shape = [1usize, m.c, m.h, m.w];
            let t = TensorRef::from_array_view((shape, &m.data[k * len..(k + 1) * len])).map_err(ort_err)?;
            inputs.push((name.to_string(), t.into()));
        }
        let outputs = session.run(inputs).map_err(ort_err).context("running the calibration model")?;
        for (i, name) in names.iter().enumerate() {
            let v = outputs.get(name.as_str()).with_context(|| format!("no output '{name}'"))?;
            let (s, d) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
            let dims: Vec<usize> = s.iter().map(|&v| v as usize).collect();
            stack(&mut out[i], name, &dims, d, k)?;
        }
    }
    out.into_iter().map(|m| m.context("no calibration crops")).collect()
}

/// Which of `names` are float32 `[1, C, H, W]` tensors when `session` runs on `crop` (the
/// others, shapes and scalars, cannot be fed back as stops of [`prune_from`]).
pub fn nchw_outputs(
    session: &mut Session,
    input: &str,
    crop: &Chw,
    names: &[String],
) -> Result<std::collections::HashSet<String>> {
    let shape = [1usize, crop.channels, crop.height, crop.width];
    let tensor = TensorRef::from_array_view((shape, &crop.data[..])).map_err(ort_err)?;
    let outputs =
        session.run(ort::inputs![tensor]).map_err(ort_err).context("running the calibration model")?;
    let mut ok = std::collections::HashSet::new();
    for name in names {
        if name == input {
            ok.insert(name.clone());
        } else if let Some(v) = outputs.get(name.as_str())
            && let Ok((s, _)) = v.try_extract_tensor::<f32>()
            && s.len() == 4
            && s[0] == 1
        {
            ok.insert(name.clone());
        }
    }
    Ok(ok)
}
