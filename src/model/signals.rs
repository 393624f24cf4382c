//! Removing a half-written temporary file when the process is interrupted (SIGINT, SIGTERM,
//! SIGHUP) during [`super::write_atomic`]: the handler unlinks every temporary file being
//! written, then re-raises the signal with its default action, so the process still ends as
//! the signal says. Handlers are installed only where the disposition is still the default (an
//! embedding program's own handler is left alone). SIGKILL cannot be caught: the next write of
//! the same output removes what a killed run left (see `remove_stale_temporaries`).

use std::ffi::{CString, c_char, c_int};
use std::path::Path;
use std::ptr;
use std::sync::Once;
use std::sync::atomic::{AtomicPtr, Ordering};

/// Temporary files being written (leaked C strings; null = free slot). A fixed array, as the
/// handler may only touch async-signal-safe state.
static PENDING: [AtomicPtr<c_char>; 8] = [const { AtomicPtr::new(ptr::null_mut()) }; 8];

const SIGNALS: [c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(sig: c_int) {
    for slot in &PENDING {
        let p = slot.swap(ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` is a leaked NUL-terminated path; unlink is async-signal-safe.
            unsafe { libc::unlink(p) };
        }
    }
    // SAFETY: restoring the default action and re-raising are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in SIGNALS {
            // SAFETY: querying then setting a disposition with a valid handler function.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_DFL {
                    let handler: extern "C" fn(c_int) = on_signal;
                    libc::signal(sig, handler as libc::sighandler_t);
                }
            }
        }
    });
}

/// Tracks `path` until dropped (then it is the caller's to persist or remove).
pub(super) struct Pending(Option<(usize, *mut c_char)>);

pub(super) fn track(path: &Path) -> Pending {
    install();
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return Pending(None) };
    let raw = c.into_raw();
    for (i, slot) in PENDING.iter().enumerate() {
        if slot.compare_exchange(ptr::null_mut(), raw, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            return Pending(Some((i, raw)));
        }
    }
    // All slots busy (many writes at once): this one is not tracked.
    // SAFETY: `raw` came from `into_raw` just above and was never shared.
    drop(unsafe { CString::from_raw(raw) });
    Pending(None)
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some((i, raw)) = self.0 {
            // The string is leaked, not freed: a handler running at this moment on another thread
            // may still read it (a few bytes per written file).
            let _ = PENDING[i].compare_exchange(raw, ptr::null_mut(), Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}
