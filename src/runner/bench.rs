//! The `bench` verb: time an original model and its ghost version in one process, on the same
//! input, with interleaved runs after a warm-up, and report median and p10/p90 latencies and
//! the ghost/original ratio of the medians. With `--cpu-time` it counts the process's CPU time
//! instead of wall time: on a machine other jobs load, wall times of one model drift by 2x
//! between runs, while the CPU time of a single-threaded run stays the work done.
//! Precision follows the models: a float16 model is fed float16 (e.g. from `convert --fp16`),
//! and `--tf32 on|off` sets TensorFloat-32 on the CUDA provider (fp32 against TF32 on a GPU).
//! On the CPU provider a float16 model runs too, but ONNX Runtime wraps nodes that lack a
//! float16 CPU kernel in Casts to float32, so CPU figures of float16 models are not fp16 compute.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use ort::value::TensorRef;
use serde::Serialize;

use super::session::{Provider, SessionConfig, ort_err};
use super::sr::{Channels, SrModel};

/// Compare the inference latency of an original SR model and its ghost version.
///
/// Both models are loaded in one process and, after a warm-up, run alternately on the same
/// input; the report gives the median and p10/p90 latency of each and the ghost/original ratio
/// of the medians.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The original model (.onnx).
    pub orig: PathBuf,
    /// The ghost model (.onnx).
    pub ghost: PathBuf,
    /// More models of the same kind to time in the same interleaved runs (e.g. the int8
    /// original and the int8 ghost model), each reported against the original. Repeatable.
    #[arg(long, value_name = "MODEL")]
    pub also: Vec<PathBuf>,
    /// Model-input size HxW (the LR size, or the HR size for pre-upsampled models).
    #[arg(long, default_value = "128x128", value_parser = parse_size)]
    pub size: (usize, usize),
    /// ONNX Runtime intra-op threads (0: one per physical core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Execution provider.
    #[arg(long, value_enum, default_value_t = Provider::Cpu)]
    pub provider: Provider,
    /// Timed runs per model.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Untimed warm-up runs per model.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// GhostShift plugin library (default: libghostsr.so next to this executable, in the ghostsr
    /// Python package, then target/release/libghostsr.so); loaded automatically for models in
    /// the ai.ghostsr domain.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Time the process's CPU time instead of wall time: stable when other jobs load the
    /// machine (their time slices do not count). Needs --threads 1: idle ONNX Runtime worker
    /// threads spin, and their spinning would count.
    #[arg(long)]
    pub cpu_time: bool,
    /// CUDA only: TensorFloat-32 for float32 Conv/MatMul (ORT's `use_tf32`; ORT's default is
    /// on, on Ampere and newer GPUs). `off` times true fp32, `on` TF32. Refused with `--provider
    /// cpu`, which has no TF32.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub tf32: Option<bool>,
}

/// Parses `on`/`off` (also `true`/`false`, `1`/`0`).
pub fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// Parses `HxW` (or a single number for a square).
pub fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    let parse = |t: &str| t.trim().parse::<usize>().map_err(|e| format!("bad size {s:?}: {e}"));
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (parse(h)?, parse(w)?),
        None => (parse(s)?, parse(s)?),
    };
    if h == 0 || w == 0 {
        return Err(format!("bad size {s:?}: zero dimension"));
    }
    Ok((h, w))
}

/// Latency statistics of one model, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub model: String,
    /// The model's input element type, as fed: "float32" or "float16".
    pub input: &'static str,
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    pub min_ms: f64,
}

/// The result of a benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub orig: Timing,
    pub ghost: Timing,
    /// ghost median / orig median.
    pub ratio: f64,
    /// Whether the times are process CPU time (`--cpu-time`) rather than wall time.
    pub cpu_time: bool,
    pub size: [usize; 2],
    pub threads: usize,
    pub provider: Provider,
    /// `--tf32` (CUDA); absent: ONNX Runtime's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tf32: Option<bool>,
    pub runs: usize,
    pub warmup: usize,
    /// `--also` models: timing and median / orig median.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<(Timing, f64)>,
}

/// The `q` quantile (0..1) of sorted values, linearly interpolated.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn timing(model: &Path, fp16: bool, mut ms: Vec<f64>) -> Timing {
    ms.sort_by(f64::total_cmp);
    Timing {
        model: model.display().to_string(),
        input: if fp16 { "float16" } else { "float32" },
        median_ms: quantile(&ms, 0.5),
        p10_ms: quantile(&ms, 0.1),
        p90_ms: quantile(&ms, 0.9),
        min_ms: ms.first().copied().unwrap_or(f64::NAN),
    }
}

/// A smooth, image-like input in [0, 1] (uniform noise makes some models, e.g. PAN, explode).
fn input_data(c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
                let t = 0.5
                    + 0.25 * (6.0 * fx + 2.0 * ch as f32).sin() * (4.0 * fy).cos()
                    + 0.1 * (40.0 * fx * fy).sin();
                v.push(t.clamp(0.0, 1.0));
            }
        }
    }
    v
}

/// CPU time used so far by every thread of this process, in milliseconds.
fn process_cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

/// The bench input in both precisions; each model gets the one its input takes.
struct Input {
    shape: [usize; 4],
    f32: Vec<f32>,
    f16: Vec<half::f16>,
}

fn time_once(model: &mut SrModel, x: &Input, cpu_time: bool) -> Result<f64> {
    let input = if model.is_fp16() {
        TensorRef::from_array_view((x.shape, &x.f16[..])).map_err(ort_err)?.into_dyn()
    } else {
        TensorRef::from_array_view((x.shape, &x.f32[..])).map_err(ort_err)?.into_dyn()
    };
    let (t0, c0) = (Instant::now(), if cpu_time { process_cpu_ms() } else { 0.0 });
    let out = model.session_mut().run(ort::inputs![input]).map_err(ort_err)?;
    drop(out);
    if cpu_time {
        let ms = process_cpu_ms() - c0;
        ensure!(ms.is_finite(), "the process CPU-time clock is not available");
        return Ok(ms);
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Benchmarks `orig` against `ghost` (see [`BenchArgs`]).
pub fn bench(args: &BenchArgs) -> Result<BenchReport> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(
        !args.cpu_time || (args.threads == 1 && args.provider == Provider::Cpu),
        "--cpu-time needs --threads 1 and the CPU provider (idle worker threads spin, and a GPU's time is not the process's)"
    );
    ensure!(
        args.tf32.is_none() || args.provider == Provider::Cuda,
        "--tf32 sets TensorFloat-32 on the CUDA provider; the CPU provider has no TF32 (drop --tf32 or add --provider cuda)"
    );
    let cfg = SessionConfig {
        threads: args.threads,
        plugin: args.plugin.clone(),
        provider: args.provider,
        tf32: args.tf32,
    };
    let mut orig = SrModel::open(&args.orig, &cfg)?;
    let mut ghost = SrModel::open(&args.ghost, &cfg)?;
    if orig.kind() != ghost.kind() {
        bail!(
            "the models differ in kind: {} is {:?}, {} is {:?}",
            args.orig.display(),
            orig.kind(),
            args.ghost.display(),
            ghost.kind()
        );
    }
    let mut also = Vec::new();
    for p in &args.also {
        let m = SrModel::open(p, &cfg)?;
        ensure!(
            m.kind() == orig.kind(),
            "{} is a {:?} model, {} a {:?} one",
            p.display(),
            m.kind(),
            args.orig.display(),
            orig.kind()
        );
        also.push(m);
    }
    let c = if orig.kind().channels == Channels::Rgb { 3 } else { 1 };
    let (h, w) = args.size;
    let shape = [1, c, h, w];
    let f32 = input_data(c, h, w);
    let x = Input { shape, f16: f32.iter().map(|&v| half::f16::from_f32(v)).collect(), f32 };
    for _ in 0..args.warmup {
        time_once(&mut orig, &x, args.cpu_time)
            .with_context(|| format!("running {}", args.orig.display()))?;
        time_once(&mut ghost, &x, args.cpu_time)
            .with_context(|| format!("running {}", args.ghost.display()))?;
        for (m, p) in also.iter_mut().zip(&args.also) {
            time_once(m, &x, args.cpu_time).with_context(|| format!("running {}", p.display()))?;
        }
    }
    let (mut to, mut tg) = (Vec::new(), Vec::new());
    let mut ta: Vec<Vec<f64>> = vec![Vec::new(); also.len()];
    for i in 0..args.runs {
        // Alternate which model goes first so neither always runs on a warmer cache.
        if i % 2 == 0 {
            to.push(time_once(&mut orig, &x, args.cpu_time)?);
            tg.push(time_once(&mut ghost, &x, args.cpu_time)?);
        } else {
            tg.push(time_once(&mut ghost, &x, args.cpu_time)?);
            to.push(time_once(&mut orig, &x, args.cpu_time)?);
        }
        for (m, t) in also.iter_mut().zip(ta.iter_mut()) {
            t.push(time_once(m, &x, args.cpu_time)?);
        }
    }
    let (o, g) = (timing(&args.orig, orig.is_fp16(), to), timing(&args.ghost, ghost.is_fp16(), tg));
    let also: Vec<(Timing, f64)> = args
        .also
        .iter()
        .zip(ta)
        .zip(&also)
        .map(|((p, t), m)| {
            let t = timing(p, m.is_fp16(), t);
            let r = t.median_ms / o.median_ms;
            (t, r)
        })
        .collect();
    Ok(BenchReport {
        ratio: g.median_ms / o.median_ms,
        cpu_time: args.cpu_time,
        orig: o,
        ghost: g,
        size: [h, w],
        threads: args.threads,
        provider: args.provider,
        tf32: args.tf32,
        runs: args.runs,
        warmup: args.warmup,
        also,
    })
}

/// Runs the `bench` verb.
pub fn run(args: BenchArgs) -> Result<()> {
    let r = bench(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "input {}x{}, {:?}{}, threads {}, {} runs after {} warm-up{}",
        r.size[0],
        r.size[1],
        r.provider,
        match r.tf32 {
            Some(true) => " (TF32 on)",
            Some(false) => " (TF32 off)",
            None => "",
        },
        r.threads,
        r.runs,
        r.warmup,
        if r.cpu_time { ", process CPU time" } else { "" }
    );
    for (label, t) in [("orig", &r.orig), ("ghost", &r.ghost)] {
        println!(
            "{label:<6} median {:9.3} ms  p10 {:9.3}  p90 {:9.3}  ({}, {})",
            t.median_ms, t.p10_ms, t.p90_ms, t.model, t.input
        );
    }
    println!("ghost/orig median ratio: {:.3}", r.ratio);
    for (t, ratio) in &r.also {
        println!(
            "also   median {:9.3} ms  p10 {:9.3}  p90 {:9.3}  ratio {ratio:.3}  ({}, {})",
            t.median_ms, t.p10_ms, t.p90_ms, t.model, t.input
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_quantiles() {
        assert_eq!(parse_size("128x96"), Ok((128, 96)));
        assert_eq!(parse_size("64"), Ok((64, 64)));
        assert!(parse_size("0x4").is_err() && parse_size("ax4").is_err());
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert!((quantile(&v, 0.1) - 1.4).abs() < 1e-12);
        assert!((quantile(&v, 0.9) - 4.6).abs() < 1e-12);
    }

    #[test]
    fn bench_runs_on_tiny_models() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
        std::fs::write(&a, crate::runner::sr::tests::tiny_model(3, 2)).unwrap();
        std::fs::write(&b, crate::runner::sr::tests::tiny_model(3, 2)).unwrap();
        let args = BenchArgs {
            orig: a,
            ghost: b.clone(),
            also: vec![],
            size: (16, 16),
            threads: 1,
            provider: Provider::Cpu,
            runs: 3,
            warmup: 1,
            plugin: None,
            json: true,
            cpu_time: false,
            tf32: None,
        };
        let r = bench(&args).unwrap();
        assert!(r.ratio > 0.0 && r.orig.p10_ms <= r.orig.p90_ms);
        let r = bench(&BenchArgs { also: vec![b.clone(), b.clone()], ..args.clone() }).unwrap();
        assert_eq!(r.also.len(), 2, "each --also model gets a row");
        assert!(r.also.iter().all(|(t, ratio)| t.model == b.display().to_string() && *ratio > 0.0));
        let r = bench(&BenchArgs { cpu_time: true, ..args.clone() }).unwrap();
        assert!(r.cpu_time && r.orig.min_ms >= 0.0 && r.ratio.is_finite());
        // CPU time with worker threads would count their spinning.
        assert!(bench(&BenchArgs { cpu_time: true, threads: 2, ..args.clone() }).is_err());
        assert!(r.orig.input == "float32" && r.ghost.input == "float32");
        // TF32 is a CUDA setting: refused on the CPU provider, naming the flag.
        for on in [true, false] {
            let e = format!("{:#}", bench(&BenchArgs { tf32: Some(on), ..args.clone() }).unwrap_err());
            assert!(e.contains("--tf32") && e.contains("CPU provider"), "{e}");
        }
    }

    /// A float16 model (as `convert --fp16` writes it) is fed float16, in bench and in
    /// `SrModel::infer`, and gives what its float32 original gives, to float16 precision.
    #[test]
    fn float16_models_are_fed_float16() {
        use prost::Message;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.onnx"), dir.path().join("a16.onnx"));
        let tiny = crate::runner::sr::tests::tiny_model(3, 2);
        let m16 = crate::emit::fp16::to_f16(&crate::onnx::ModelProto::decode(&tiny[..]).unwrap()).unwrap();
        std::fs::write(&a, &tiny).unwrap();
        std::fs::write(&b, m16.encode_to_vec()).unwrap();
        let cfg = SessionConfig { threads: 1, ..Default::default() };
        let (mut m32, mut m16) = (SrModel::open(&a, &cfg).unwrap(), SrModel::open(&b, &cfg).unwrap());
        assert!(!m32.is_fp16() && m16.is_fp16());
        assert_eq!(m16.kind(), m32.kind(), "the probe runs the float16 model");
        let x = crate::runner::sr::Chw { channels: 3, height: 12, width: 10, data: input_data(3, 12, 10) };
        let (y32, y16) = (m32.infer(&x).unwrap(), m16.infer(&x).unwrap());
        assert_eq!((y16.height, y16.width, y16.data.len()), (24, 20, y32.data.len()));
        let scale = y32.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = y32.data.iter().zip(&y16.data).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(scale > 0.0 && err <= 1e-2 * scale.max(1.0), "float16 output off by {err} (scale {scale})");
        let args = BenchArgs {
            orig: a,
            ghost: b.clone(),
            also: vec![b],
            size: (16, 16),
            threads: 1,
            provider: Provider::Cpu,
            runs: 2,
            warmup: 1,
            plugin: None,
            json: true,
            cpu_time: false,
            tf32: None,
        };
        let r = bench(&args).unwrap();
        assert_eq!((r.orig.input, r.ghost.input, r.also[0].0.input), ("float32", "float16", "float16"));
        assert!(r.ratio > 0.0 && r.also[0].1 > 0.0);
    }

    #[test]
    fn tf32_flag_parses_on_and_off() {
        assert_eq!(parse_on_off("on"), Ok(true));
        assert_eq!(parse_on_off("OFF"), Ok(false));
        assert_eq!(parse_on_off("1"), Ok(true));
        assert!(parse_on_off("maybe").is_err());
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            b: BenchArgs,
        }
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(["bench", "a.onnx", "b.onnx"].iter().chain(extra)).map(|c| c.b.tf32)
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["--tf32", "off"]).unwrap(), Some(false));
        assert_eq!(parse(&["--tf32", "on"]).unwrap(), Some(true));
        assert!(parse(&["--tf32", "half"]).is_err());
    }
}
