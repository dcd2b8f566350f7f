//! Process exit while the engine thread computes.
//!
//! When a process ends by `exit` (main returning, a test harness finishing)
//! libc runs llama.cpp's static destructors on the exiting thread while the
//! engine thread may still be inside `llama_decode` (it decodes a finished
//! reply's last token as soon as it goes idle), and the compute then reads
//! freed memory. An `atexit` handler registered after llama.cpp's own (so
//! it runs before them) marks the process as exiting, which aborts a step
//! in progress at its next graph node (an injected stall included), and
//! waits until no decode is running, at most `EXIT_WAIT`; none starts
//! after that.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once, TryLockError};
use std::time::{Duration, Instant};

/// The longest an exit waits for a decode to stop: an abort takes effect at
/// the next graph node, so this is only reached by a node that never ends.
const EXIT_WAIT: Duration = Duration::from_secs(2);

static EXITING: AtomicBool = AtomicBool::new(false);
static IN_COMPUTE: Mutex<()> = Mutex::new(());
static REGISTER: Once = Once::new();

extern "C" {
    fn atexit(f: extern "C" fn()) -> c_int;
}

extern "C" fn on_exit() {
    EXITING.store(true, Ordering::SeqCst);
    let until = Instant::now() + EXIT_WAIT;
    loop {
        let guard = match IN_COMPUTE.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(TryLockError::WouldBlock) => return,
        };
        // Held until the process is gone: no decode starts after this.
        std::mem::forget(guard);
        return;
    }
}

/// Register the handler; call once llama.cpp is loaded (a context exists),
/// so that it runs before llama.cpp's static destructors.
pub fn register() {
    REGISTER.call_once(|| {
        // SAFETY: `atexit` is libc's; `on_exit` is a plain function that
        // lives as long as the program and touches only statics.
        unsafe {
            atexit(on_exit);
        }
    });
}

/// Whether the process is exiting: the abort callback stops the step.
pub fn exiting() -> bool {
    EXITING.load(Ordering::Relaxed)
}

/// Held for the length of one decode.
pub fn computing() -> MutexGuard<'static, ()> {
    IN_COMPUTE.lock().unwrap_or_else(|e| e.into_inner())
}
