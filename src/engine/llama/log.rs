//! llama.cpp's log, routed into `tracing`, and the size lines it prints
//! while a context is created (how much memory the KV and the compute
//! buffers take).

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

use llama_cpp_sys_2 as sys;

static BACKEND: Once = Once::new();

/// Initialise llama.cpp once per process and route its log into `tracing`.
pub(super) fn init_backend() {
    // SAFETY: run once per process (Once), before any other llama.cpp
    // call; the log callback is a plain function that lives forever.
    BACKEND.call_once(|| unsafe {
        sys::llama_log_set(Some(log_to_tracing), std::ptr::null_mut());
        sys::llama_backend_init();
    });
}

/// llama.cpp's lines reporting KV buffer sizes, gathered while a context is
/// created (they are how much memory the KV takes).
pub(super) static KV_SIZE_LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// llama.cpp's lines reporting the context's other buffers (compute and
/// output), gathered the same way.
pub(super) static BUFFER_SIZE_LINES: std::sync::Mutex<Vec<String>> =
    std::sync::Mutex::new(Vec::new());

/// Sum the MiB of `size = X MiB` lines.
pub(super) fn kv_bytes_of(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|l| {
            l.split("size =")
                .nth(1)?
                .split("MiB")
                .next()?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|mib| (mib * (1 << 20) as f64) as u64)
        .sum()
}

thread_local! {
    /// llama.cpp's warnings and errors on this thread, while `capture_log`
    /// collects them.
    static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Run `f`, collecting the warnings and errors llama.cpp logs on this
/// thread meanwhile (they are logged at debug level instead): the reason
/// a client's grammar was refused, for its error message.
pub(crate) fn capture_log<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let prev = CAPTURED.with(|c| c.borrow_mut().replace(Vec::new()));
    let out = f();
    let lines = CAPTURED
        .with(|c| std::mem::replace(&mut *c.borrow_mut(), prev))
        .unwrap_or_default();
    (out, lines)
}

/// Keep a log line for `capture_log` if one is running on this thread.
fn capture_line(level: sys::ggml_log_level, msg: &str) -> bool {
    CAPTURED
        .try_with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else {
                return false;
            };
            let Some(lines) = c.as_mut() else {
                return false;
            };
            match level {
                sys::GGML_LOG_LEVEL_ERROR | sys::GGML_LOG_LEVEL_WARN => lines.push(msg.to_string()),
                sys::GGML_LOG_LEVEL_CONT => {
                    if let Some(last) = lines.last_mut() {
                        last.push_str(msg);
                    }
                }
                _ => {}
            }
            true
        })
        .unwrap_or(false)
}

/// # Safety
/// Called by llama.cpp with a NUL-terminated string (or null).
unsafe extern "C" fn log_to_tracing(
    level: sys::ggml_log_level,
    text: *const c_char,
    _: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: not null (checked), NUL-terminated by llama.cpp, and only
    // borrowed for this call.
    let msg = CStr::from_ptr(text).to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    if (msg.starts_with("llama_kv_cache") || msg.starts_with("llama_memory_recurrent"))
        && msg.contains(" cells,")
        && msg.contains("size =")
    {
        if let Ok(mut lines) = KV_SIZE_LINES.lock() {
            lines.push(msg.to_string());
        }
    }
    if msg.contains(" compute buffer size =") || msg.contains(" output buffer size =") {
        if let Ok(mut lines) = BUFFER_SIZE_LINES.lock() {
            lines.push(msg.to_string());
        }
    }
    if capture_line(level, msg) {
        tracing::debug!(target: "llama.cpp", "{msg}");
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::error!(target: "llama.cpp", "{msg}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama.cpp", "{msg}"),
        _ => tracing::debug!(target: "llama.cpp", "{msg}"),
    }
}
