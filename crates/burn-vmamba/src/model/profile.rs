//! Optional per-op timing of the model's forward pass, for `cargo xtask bench model`.
//!
//! Off by default: every [`scope`] then just runs its closure. Between [`start`] and
//! [`finish`] on a thread, each scope synchronises the device before and after its op
//! (`Backend::sync`) and records the wall time under the op's name, so the times are those of
//! the op alone on any backend, eager or asynchronous. Synchronising changes what a fusing
//! backend can fuse and adds a round trip per op on a GPU: the sum of a profiled pass is
//! larger than an unprofiled one there. Backward passes are not broken down.

use std::cell::RefCell;
use std::time::Instant;

use burn::tensor::backend::Backend;

thread_local! {
    static RECORDS: RefCell<Option<Vec<(&'static str, f64)>>> = const { RefCell::new(None) };
}

/// Starts recording on this thread (dropping anything recorded before).
pub fn start() {
    RECORDS.set(Some(vec![]));
}

/// Stops recording and returns `(op, seconds)` per executed scope, in execution order.
pub fn finish() -> Vec<(&'static str, f64)> {
    RECORDS.take().unwrap_or_default()
}

/// Runs `op`; while recording, times it between two device synchronisations.
pub fn scope<B: Backend, T>(name: &'static str, device: &B::Device, op: impl FnOnce() -> T) -> T {
    if RECORDS.with_borrow(Option::is_none) {
        return op();
    }
    let sync = || {
        B::sync(device).unwrap_or_else(|e| panic!("profile: device sync failed: {e:?}"));
    };
    sync();
    let start = Instant::now();
    let out = op();
    sync();
    let seconds = start.elapsed().as_secs_f64();
    RECORDS.with_borrow_mut(|r| {
        if let Some(r) = r {
            r.push((name, seconds));
        }
    });
    out
}
