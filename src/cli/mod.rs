//! The `ghostsr` command line: flags, help texts, progress and summaries.
//!
//! One file per verb (`inspect`, `plan`, `convert`, `sweep`; `generate`, `upscale`, `eval` and
//! `bench` keep their flags beside their code), the flag groups several verbs share in [`args`],
//! and progress output in [`progress`]. Each verb parses its flags into the library's option
//! types and calls the pipeline (model I/O -> analysis -> plan -> emit); nothing here walks a
//! graph. Errors are returned with context and printed once by `main`, with the whole cause chain.

use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod args;
pub mod convert;
pub mod inspect;
pub mod plan;
pub mod progress;
pub mod sweep;

pub use convert::ConvertArgs;
pub use inspect::InspectArgs;
pub use plan::PlanArgs;
pub use sweep::SweepArgs;

const ABOUT: &str = "Make pretrained ONNX super-resolution models cheaper with ghost features (GhostSR).";
const LONG_ABOUT: &str = "\
Make pretrained ONNX super-resolution models cheaper with ghost features (GhostSR).

In a pretrained SR network many Conv output channels are near copies of others, shifted by a
pixel. ghostsr clusters each eligible Conv's filters (k-means), keeps the filter nearest each
centroid (intrinsic) and replaces the others by shifted copies of intrinsic outputs (ghosts):
the Conv becomes a smaller Conv + GhostShift + Concat, and the rest of the network stays exact.

Typical use:
  ghostsr inspect model.onnx                      what would be ghosted, and why not
  ghostsr convert model.onnx -o model.ghost.onnx  plan and rewrite (needs the plugin to run)
  ghostsr convert model.onnx -o g.onnx --emit standard   standard ONNX ops only
  ghostsr plan model.onnx -o plan.json            write the plan (for a trainer, or to edit)
  ghostsr convert model.onnx --plan plan.json -o model.ghost.onnx
  ghostsr plan model.onnx -o plan.json --export-weights w.safetensors   weights for a trainer
  ghostsr convert model.onnx --plan tuned.json --weights tuned.safetensors -o model.ghost.onnx
  ghostsr convert model.onnx -o g.onnx --calib BSD68/   ghosts chosen from calibration data
      (much better quality without training; needs ONNX Runtime)
  ghostsr eval model.ghost.onnx --images Set5/ --scale 2       PSNR/SSIM (needs ONNX Runtime)
  ghostsr convert model.onnx -o q.onnx --calib BSD68/ --target cpu-int8   int8 model (QDQ)
  ghostsr bench model.onnx model.ghost.onnx --size 128x128     latency ratio
  ghostsr sweep model.onnx --images Set5/ --scale 2 --calib BSD68/ --plot sweep.svg

Running models needs ONNX Runtime (onnxruntime>=1.17,<2). After `pip install ghostsr` it is
found in the same Python environment; otherwise set ORT_DYLIB_PATH to libonnxruntime.so (e.g.
site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 of `pip install onnxruntime`), which
always wins, or install it in a system library folder. Ghost models in plugin form load
libghostsr.so automatically (next to this executable, in the ghostsr Python package, or
target/release/; --plugin PATH overrides).";

#[derive(Parser, Debug)]
#[command(name = "ghostsr", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List operators, parameters, multiply-adds, and every Conv with why it is or is not eligible.
    Inspect(InspectArgs),
    /// Plan the ghosts (k-means on filters) and write the plan as JSON.
    Plan(PlanArgs),
    /// Rewrite a model into its ghost form, from a plan file or planning on the fly.
    Convert(ConvertArgs),
    /// Generate a synthetic SR network (EDSR, EDSR-baseline, RDN-, RCAN-style) with deterministic
    /// weights, for fixtures, tests and benchmarks.
    Generate(crate::generate::GenerateArgs),
    /// Upscale an image (PNG/JPEG) with an SR model, original or ghost, in ONNX Runtime.
    Upscale(crate::runner::upscale::UpscaleArgs),
    /// PSNR/SSIM on Y of a model over a folder of HR images (the reference protocol).
    Eval(crate::runner::eval::EvalArgs),
    /// Time an original and a ghost model in one process, interleaved, and report the ratio.
    Bench(crate::runner::bench::BenchArgs),
    /// PSNR against multiply-adds for several ratios, paper selection and (with --calib)
    /// calibrated: a table, JSON, and an SVG plot.
    Sweep(SweepArgs),
}

/// Parses the command line and runs the verb.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect(a) => inspect::run(&a),
        Command::Plan(a) => plan::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Generate(a) => crate::generate::run(&a),
        Command::Upscale(a) => crate::runner::upscale::run(a),
        Command::Eval(a) => crate::runner::eval::run(a),
        Command::Bench(a) => crate::runner::bench::run(a),
        Command::Sweep(a) => sweep::run(&a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::budget::Budget;
    use crate::emit::EmitMode;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ghostsr").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused() {
        let Command::Convert(c) =
            parse(&["convert", "m.onnx", "-o", "g.onnx", "--ratio", "0.25", "--emit", "standard"])
                .unwrap()
                .command
        else {
            panic!("not convert")
        };
        assert_eq!(c.planning.ratio, Some(0.25));
        assert_eq!(c.emit, EmitMode::Standard);
        assert_eq!(c.planning.options().max_shift, 1, "default max shift");
        for bad in [
            &["convert", "m.onnx", "-o", "g.onnx", "--ratio", "1.0"][..],
            &["convert", "m.onnx", "-o", "g.onnx", "--ratio", "-0.1"],
            &["convert", "m.onnx", "-o", "g.onnx", "--max-shift", "9"],
            &["convert", "m.onnx", "-o", "g.onnx", "--emit", "other"],
            &["convert", "m.onnx"],
            &["plan", "m.onnx"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        let Command::Plan(p) =
            parse(&["plan", "m.onnx", "-o", "p.json", "--include", "a", "--include", "b", "--allow-1x1"])
                .unwrap()
                .command
        else {
            panic!("not plan")
        };
        assert_eq!(p.policy.include, vec!["a", "b"]);
        assert!(p.policy.policy().allow_1x1);
    }

    #[test]
    fn budget_flags_exclude_kmeans_ratio_and_each_other() {
        let base = ["convert", "m.onnx", "-o", "g.onnx", "--calib", "dir"];
        let with =
            |extra: &[&'static str]| -> Vec<&'static str> { base.iter().chain(extra).copied().collect() };
        let Command::Convert(c) = parse(&with(&["--max-psnr-drop", "0.3"])).unwrap().command else {
            panic!("not convert")
        };
        assert_eq!(c.budget.budget(), Some(Budget::MaxPsnrDrop(0.3)));
        let Command::Plan(p) =
            parse(&["plan", "m.onnx", "-o", "p.json", "--calib", "d", "--target-macs", "0.6"])
                .unwrap()
                .command
        else {
            panic!("not plan")
        };
        assert_eq!(p.budget.budget(), Some(Budget::TargetMacs(0.6)));
        for bad in [
            vec!["convert", "m.onnx", "-o", "g.onnx", "--kmeans", "--max-psnr-drop", "0.3"],
            vec!["convert", "m.onnx", "-o", "g.onnx", "--kmeans", "--target-macs", "0.5"],
            vec!["convert", "m.onnx", "-o", "g.onnx", "--kmeans", "--calib", "d"],
            vec!["convert", "m.onnx", "-o", "g.onnx", "--kmeans", "--calib-count", "4"],
            with(&["--max-psnr-drop", "0.3", "--target-macs", "0.5"]),
            with(&["--max-psnr-drop", "0.3", "--ratio", "0.5"]),
            with(&["--target-macs", "0.5", "--ratio", "0.5"]),
            with(&["--target-macs", "1.0"]),
            with(&["--target-macs", "0"]),
            with(&["--max-psnr-drop", "-1"]),
            with(&["--max-psnr-drop", "nan"]),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_plan_file_and_planning_flags_exclude_each_other() {
        let Command::Convert(c) =
            parse(&["convert", "m.onnx", "-o", "g.onnx", "--plan", "p.json", "--ratio", "0.3"])
                .unwrap()
                .command
        else {
            panic!("not convert")
        };
        let err = convert::run(&c).unwrap_err().to_string();
        assert!(err.contains("--plan applies a plan file as it is"), "{err}");
    }
}
