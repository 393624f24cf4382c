//! Progress on stderr for long work: a rewriting counter on a terminal, a few lines otherwise
//! (so logs of CI and batch jobs stay short).

use std::io::IsTerminal;

/// Progress of a multi-stage job on stderr: a rewriting counter on a terminal, a few lines per
/// stage otherwise.
pub fn staged_progress() -> impl Fn(&str, usize, usize) + Sync {
    let tty = std::io::stderr().is_terminal();
    move |stage, done, total| {
        if tty {
            eprint!("\r{stage}: {done}/{total}   ");
            if done == total {
                eprintln!();
            }
        } else if done == total || (total >= 8 && (done * 4 / total != (done - 1) * 4 / total)) {
            eprintln!("{stage}: {done}/{total}");
        }
    }
}

/// Progress on stderr: a rewriting counter on a terminal, a few lines otherwise.
pub fn progress(label: &'static str) -> impl Fn(usize, usize, &str) + Sync {
    let tty = std::io::stderr().is_terminal();
    move |done, total, _layer| {
        if tty {
            eprint!("\r{label}: {done}/{total} layers");
            if done == total {
                eprintln!();
            }
        } else if total >= 8 && (done * 4 / total != (done - 1) * 4 / total) {
            eprintln!("{label}: {done}/{total} layers");
        }
    }
}
