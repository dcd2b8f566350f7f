//! A thin safe layer over llama.cpp's C API (`llama-cpp-sys-2`).
//!
//! The safe `llama-cpp-2` crate hides the raw context, and with it the two
//! things hearth is built on: the abort callback that llama.cpp's CPU
//! backend calls after every graph node (how a client that leaves stops a
//! prefill chunk half-way, and where fault injection stalls), and direct
//! control of the KV memory. So this module owns those pointers itself and
//! exposes only what the worker needs.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Once};

use llama_cpp_sys_2 as sys;

use super::threads::ThreadPools;

/// A token id in the model's vocabulary.
pub type Token = i32;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LlamaError {
    #[error("cannot load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("cannot create a llama.cpp context (n_ctx {n_ctx}): out of memory or unsupported parameters")]
    Context { n_ctx: u32 },
    #[error("draft model {path} cannot draft for this model: {reason}")]
    Draft { path: String, reason: String },
}

/// Why `Context::decode` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The abort callback asked llama.cpp to stop (status 2).
    Aborted,
    /// No KV slot for the batch (status 1): the context is full.
    NoSlot,
    /// Any other failure, with llama.cpp's status code.
    Failed(i32),
}

static BACKEND: Once = Once::new();

/// Initialise llama.cpp once per process and route its log into `tracing`.
fn init_backend() {
    // SAFETY: run once per process (Once), before any other llama.cpp
    // call; the log callback is a plain function that lives forever.
    BACKEND.call_once(|| unsafe {
        sys::llama_log_set(Some(log_to_tracing), std::ptr::null_mut());
        sys::llama_backend_init();
    });
}

/// llama.cpp's lines reporting KV buffer sizes, gathered while a context is
/// created (they are how much memory the KV takes).
static KV_SIZE_LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// llama.cpp's lines reporting the context's other buffers (compute and
/// output), gathered the same way.
static BUFFER_SIZE_LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Sum the MiB of `size = X MiB` lines.
fn kv_bytes_of(lines: &[String]) -> u64 {
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

/// Loaded weights and vocabulary. Immutable after load, so it is shared
/// between the engine thread (which computes) and the HTTP side (which
/// tokenizes before queueing a job).
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    path: String,
}

// SAFETY: a llama_model is never written after `llama_model_load_from_file`
// returns: contexts read its weights, and everything `Model` calls takes it
// (or its vocab) as `const` and only reads it. The calls made off the
// engine thread are tokenization and detokenization (`llama_tokenize`,
// `llama_token_to_piece`), which llama.h declares thread-safe ("The API is
// thread-safe", its Tokenization section): each call builds its own
// tokenizer session over the immutable vocab, whose piece cache is filled
// at load time; the other vocab and metadata getters read fields set at
// load, and grammar samplers built for validation only read the vocab.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the last owner drops the model: contexts hold an Arc to
        // it, so none outlives it, and it is freed exactly once.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

impl Model {
    /// Load a GGUF file. `n_gpu_layers` is ignored by CPU builds.
    pub fn load(path: &Path, n_gpu_layers: i32) -> Result<Arc<Model>, LlamaError> {
        init_backend();
        let shown = path.display().to_string();
        let fail = |reason: &str| LlamaError::Load {
            path: shown.clone(),
            reason: reason.into(),
        };
        if !path.is_file() {
            return Err(fail("no such file"));
        }
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| fail("path contains NUL"))?;
        // SAFETY: returns a struct by value; no pointers involved.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = n_gpu_layers;
        if cpu_has_amx() {
            // llama.cpp's AMX matmul kernels crash (SIGSEGV in
            // ggml_backend_amx_mul_mat) on the first prefill on CPUs with
            // AMX; the AMX buffer type is one of the "extra" ones, so
            // weights stay in plain CPU buffers there.
            tracing::info!("CPU has AMX: llama.cpp's extra (AMX, repacked) weight buffers are off");
            params.use_extra_bufts = false;
        }
        // SAFETY: `cpath` is a NUL-terminated path that outlives the call;
        // null (a failed load) is handled below.
        let raw = unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), params) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            fail("llama.cpp could not load it (not a GGUF, or an unsupported architecture)")
        })?;
        // SAFETY: `ptr` is the model just loaded; the vocab it returns lives
        // as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let vocab = NonNull::new(vocab as *mut sys::llama_vocab)
            .ok_or_else(|| fail("model has no vocabulary"))?;
        Ok(Arc::new(Model {
            ptr,
            vocab,
            path: shown,
        }))
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    /// The vocabulary, for samplers that read it (grammar). Read-only.
    pub(crate) fn vocab_ptr(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    /// Tokenize text. `parse_special` lets the text's special-token markup
    /// (`<|im_start|>`) become control tokens; it must only be set for text
    /// the template produced, never for raw client text.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<Token> {
        let len = i32::try_from(text.len()).unwrap_or(i32::MAX);
        let mut out: Vec<Token> = vec![0; text.len() / 2 + 8];
        loop {
            // SAFETY: the vocab is valid (see `vocab`); llama.cpp reads `len`
            // bytes of `text` and writes at most `out.len()` tokens, and a
            // negative result (too small) is handled by growing `out`.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const c_char,
                    len,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return out;
            }
            if n == i32::MIN {
                return Vec::new();
            }
            out.resize((-n) as usize, 0);
        }
    }

    /// The bytes a token stands for as plain text. Control tokens give
    /// nothing. (Generated text uses [`Model::token_text`] instead, so
    /// control tokens that mark tool calls reach the tool parsers.)
    pub fn token_bytes(&self, token: Token) -> Vec<u8> {
        self.piece(token, false)
    }

    fn piece(&self, token: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        loop {
            // SAFETY: the vocab is valid; llama.cpp writes at most `buf.len()`
            // bytes and says how many it needs when that is too few.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// Whether a token ends generation (EOS, end-of-turn, ...).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: `self.vocab` is the loaded model's vocabulary, valid until the
        // model is freed (Drop, with the last Arc); this call only reads it.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// Whether the tokenizer prepends BOS by itself.
    pub fn adds_bos(&self) -> bool {
        // SAFETY: `self.vocab` is the loaded model's vocabulary, valid until the
        // model is freed (Drop, with the last Arc); this call only reads it.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    pub fn bos(&self) -> Option<Token> {
        // SAFETY: `self.vocab` is the loaded model's vocabulary, valid until the
        // model is freed (Drop, with the last Arc); this call only reads it.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        (t >= 0).then_some(t)
    }

    /// The text of a special token (`<|im_end|>`), for templates.
    pub fn special_text(&self, token: Option<Token>) -> String {
        token
            .map(|t| String::from_utf8_lossy(&self.piece(t, true)).into_owned())
            .unwrap_or_default()
    }

    pub fn bos_text(&self) -> String {
        self.special_text(self.bos())
    }

    pub fn eos_text(&self) -> String {
        // SAFETY: `self.vocab` is the loaded model's vocabulary, valid until the
        // model is freed (Drop, with the last Arc); this call only reads it.
        let t = unsafe { sys::llama_vocab_eos(self.vocab()) };
        self.special_text((t >= 0).then_some(t))
    }

    /// The text of a token as the template writes it: special tokens
    /// (`<|im_end|>`) included. The live sequence's text is built from
    /// these, so it can be compared with a newly rendered prompt.
    pub fn token_text(&self, token: Token) -> Vec<u8> {
        self.piece(token, true)
    }

    /// Sliding-window attention layers cannot rewind past their window
    /// unless the context keeps a full-size window cache.
    pub fn has_swa(&self) -> bool {
        // SAFETY: `self.ptr` is a loaded model, valid until Drop; a read-only getter.
        unsafe { sys::llama_model_n_swa(self.ptr.as_ptr()) > 0 }
    }

    /// Recurrent state cannot be rewound at all, only extended or cleared.
    pub fn is_recurrent(&self) -> bool {
        // SAFETY: `self.ptr` is a loaded model, valid until Drop; a read-only getter.
        unsafe {
            sys::llama_model_is_recurrent(self.ptr.as_ptr())
                || sys::llama_model_is_hybrid(self.ptr.as_ptr())
        }
    }

    /// Identifies the weights: a KV snapshot is only valid for the model
    /// that computed it. Hashes the file's size and its first 4 MiB (the
    /// GGUF header, metadata and tensor index) with the parameter count.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        use std::io::Read;
        let mut h = Sha256::new();
        h.update(self.n_params().to_le_bytes());
        h.update(self.n_vocab().to_le_bytes());
        if let Ok(f) = std::fs::File::open(&self.path) {
            if let Ok(meta) = f.metadata() {
                h.update(meta.len().to_le_bytes());
            }
            let mut head = Vec::with_capacity(4 << 20);
            let _ = f.take(4 << 20).read_to_end(&mut head);
            h.update(&head);
        }
        h.finalize().into()
    }

    pub fn n_vocab(&self) -> i32 {
        // SAFETY: `self.vocab` is the loaded model's vocabulary, valid until the
        // model is freed (Drop, with the last Arc); this call only reads it.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }
    }

    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: `self.ptr` is a loaded model, valid until Drop; a read-only getter.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) }.max(0) as u32
    }

    pub fn size_bytes(&self) -> u64 {
        // SAFETY: `self.ptr` is a loaded model, valid until Drop; a read-only getter.
        unsafe { sys::llama_model_size(self.ptr.as_ptr()) }
    }

    pub fn n_params(&self) -> u64 {
        // SAFETY: `self.ptr` is a loaded model, valid until Drop; a read-only getter.
        unsafe { sys::llama_model_n_params(self.ptr.as_ptr()) }
    }

    /// The GGUF's own chat template, if it has one.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: a loaded model; the string it returns (or null, checked
        // below) is owned by the model and outlives this copy of it.
        let p = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, owned by the live model.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        (!s.trim().is_empty()).then_some(s)
    }

    /// A GGUF metadata value as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: a loaded model and a NUL-terminated key; llama.cpp
            // writes at most `buf.len()` bytes (NUL included) and returns the
            // full length, so a longer value is fetched again.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.ptr.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    /// A short human description ("llama 135M Q4_1").
    pub fn description(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: a loaded model; llama.cpp writes at most `buf.len()` bytes.
        let n = unsafe {
            sys::llama_model_desc(
                self.ptr.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
            )
        };
        buf.truncate(n.max(0) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Whether this CPU has AMX (Linux reports it in /proc/cpuinfo).
fn cpu_has_amx() -> bool {
    cfg!(target_arch = "x86_64")
        && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && l.contains(" amx_int8"))
        })
}

/// Called by llama.cpp inside graph compute; `true` aborts the decode.
pub type AbortFn = dyn Fn() -> bool + Send + Sync;

/// How a context is created.
#[derive(Debug, Clone, Copy)]
pub struct ContextParams {
    /// KV cells in all: shared by every sequence (one unified buffer).
    pub n_ctx: u32,
    pub n_batch: u32,
    /// Compute threads until [`Context::set_threads`] says otherwise.
    pub n_threads: usize,
    /// The thread pools' poll level (see `threads::ThreadSettings::poll`).
    pub poll: u32,
    /// Sequences the KV holds at once (1: today's single sequence).
    pub n_seq_max: u32,
}

/// The sequence id of a KV row.
pub type SeqId = i32;

/// One row of a batch: a token of one sequence at one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub token: Token,
    pub pos: usize,
    pub seq: SeqId,
    /// Keep this row's logits (read back with [`Context::logits`] by the
    /// row's index in the batch).
    pub logits: bool,
}

/// A llama.cpp context: one unified KV buffer holding up to `n_seq_max`
/// sequences. Owned by exactly one thread at a time.
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    batch: sys::llama_batch,
    batch_cap: usize,
    /// Boxed twice so llama.cpp holds a stable thin pointer to it for the
    /// context's whole life.
    _abort: Box<Box<AbortFn>>,
    /// Bytes of KV buffers, as llama.cpp reported them at creation.
    kv_bytes: u64,
    /// Bytes of the compute and output buffers, reported the same way.
    buffer_bytes: u64,
    /// Keeps the weights alive as long as the context that reads them.
    model: Arc<Model>,
    /// The pools its graphs compute on; dropped after the context is freed.
    pools: ThreadPools,
}

// SAFETY: a context is used from one thread at a time (the engine thread
// creates it and keeps it); nothing in it is tied to the creating thread.
unsafe impl Send for Context {}

/// # Safety
/// `data` is the `Box<AbortFn>` that `Context::new` passed as the callback
/// data; the context keeps it alive (`_abort`) for as long as llama.cpp may call.
unsafe extern "C" fn abort_trampoline(data: *mut c_void) -> bool {
    if super::exit::exiting() {
        return true;
    }
    // SAFETY: see above; the closure is Sync, so calling it from a compute
    // thread is sound.
    let f = &*(data as *const Box<AbortFn>);
    f()
}

impl Context {
    pub fn new(
        model: Arc<Model>,
        params: ContextParams,
        abort: Box<AbortFn>,
    ) -> Result<Context, LlamaError> {
        let abort: Box<Box<AbortFn>> = Box::new(abort);
        // SAFETY: returns a struct by value; no pointers involved.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = params.n_ctx;
        p.n_batch = params.n_batch;
        // One micro-batch per chunk: an abort then drops exactly the chunk
        // in flight, and progress is reported per computed chunk.
        p.n_ubatch = params.n_batch;
        p.n_seq_max = params.n_seq_max.max(1);
        // One buffer for every sequence, so a prefix copied between
        // sequences (`seq_cp`) shares its cells instead of duplicating them.
        p.kv_unified = params.n_seq_max > 1;
        p.n_threads = params.n_threads.max(1) as i32;
        p.n_threads_batch = p.n_threads;
        p.no_perf = true;
        // A full-size sliding-window cache lets the KV rewind to any
        // position, so prefix reuse works on SWA models (Gemma 3) at the
        // cost of window-layer memory growing to the full context.
        p.swa_full = model.has_swa();
        p.abort_callback = Some(abort_trampoline);
        p.abort_callback_data = &*abort as *const Box<AbortFn> as *mut c_void;
        for lines in [&KV_SIZE_LINES, &BUFFER_SIZE_LINES] {
            if let Ok(mut lines) = lines.lock() {
                lines.clear();
            }
        }
        // SAFETY: the model outlives the context (the Arc is kept in it);
        // the abort data pointer stays valid as long as `abort` lives.
        let raw = unsafe { sys::llama_init_from_model(model.ptr.as_ptr(), p) };
        let ptr = NonNull::new(raw).ok_or(LlamaError::Context {
            n_ctx: params.n_ctx,
        })?;
        super::exit::register();
        let kv_bytes = KV_SIZE_LINES.lock().map(|l| kv_bytes_of(&l)).unwrap_or(0);
        let buffer_bytes = BUFFER_SIZE_LINES
            .lock()
            .map(|l| kv_bytes_of(&l))
            .unwrap_or(0);
        let batch_cap = params.n_batch.max(1) as usize;
        // SAFETY: allocates a batch for `batch_cap` tokens with one sequence
        // id each; freed once, in Drop.
        let batch = unsafe { sys::llama_batch_init(batch_cap as i32, 0, 1) };
        let mut ctx = Context {
            ptr,
            batch,
            batch_cap,
            _abort: abort,
            kv_bytes,
            buffer_bytes,
            model,
            pools: ThreadPools::new(params.poll),
        };
        ctx.set_threads(params.n_threads);
        Ok(ctx)
    }

    /// Compute the next graphs on `n` threads (on a pool of its own, made
    /// the first time that count is asked for).
    pub fn set_threads(&mut self, n: usize) {
        // SAFETY: `self.ptr` is live and not computing (we hold it
        // mutably); the pools are dropped after the context is freed.
        unsafe { self.pools.attach(self.ptr.as_ptr(), n) }
    }

    /// The threads the next graph computes on.
    pub fn threads(&self) -> usize {
        self.pools.active().unwrap_or(1)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> u32 {
        // SAFETY: `self.ptr` is a live context, valid until Drop.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) }
    }

    /// Bytes the KV buffers take (0 when llama.cpp did not say).
    pub fn kv_bytes(&self) -> u64 {
        self.kv_bytes
    }

    /// Bytes of the compute and output buffers (0 when llama.cpp did not
    /// say).
    pub fn buffer_bytes(&self) -> u64 {
        self.buffer_bytes
    }

    pub fn n_batch(&self) -> usize {
        self.batch_cap
    }

    /// Evaluate `tokens` of sequence 0 at positions `pos..`, in one
    /// micro-batch. Logits are kept for the last token only when
    /// `want_logits`.
    pub fn decode(
        &mut self,
        tokens: &[Token],
        pos: usize,
        want_logits: bool,
    ) -> Result<(), DecodeError> {
        let n = tokens.len();
        let rows: Vec<Row> = tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| Row {
                token,
                pos: pos + i,
                seq: 0,
                logits: want_logits && i + 1 == n,
            })
            .collect();
        self.decode_rows(&rows)
    }

    /// Evaluate one batch of rows (any sequences, each sequence's rows at
    /// consecutive positions following what its KV holds) in one
    /// micro-batch: an abort then drops exactly this batch.
    pub fn decode_rows(&mut self, rows: &[Row]) -> Result<(), DecodeError> {
        assert!(
            !rows.is_empty() && rows.len() <= self.batch_cap,
            "batch of {} rows",
            rows.len()
        );
        let b = &mut self.batch;
        // SAFETY: the batch was allocated for batch_cap tokens and one
        // sequence id each; we write within those bounds.
        unsafe {
            for (i, r) in rows.iter().enumerate() {
                *b.token.add(i) = r.token;
                *b.pos.add(i) = r.pos as i32;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = r.seq;
                *b.logits.add(i) = r.logits as i8;
            }
        }
        b.n_tokens = rows.len() as i32;
        let _computing = super::exit::computing();
        // SAFETY: a live context and the batch it was created with, filled
        // above within its capacity; `&mut self` means no other call on the
        // context runs meanwhile (the abort callback only reads its own data).
        match unsafe { sys::llama_decode(self.ptr.as_ptr(), self.batch) } {
            0 => Ok(()),
            1 => Err(DecodeError::NoSlot),
            2 => Err(DecodeError::Aborted),
            code => Err(DecodeError::Failed(code)),
        }
    }

    /// Logits of batch row `i` of the last decode (negative: from the
    /// end); empty when that row kept none.
    pub fn logits(&self, i: i32) -> &[f32] {
        let n = self.model.n_vocab() as usize;
        // SAFETY: llama.cpp returns null for a row without logits, else a
        // pointer to n_vocab floats that live until the next decode; the
        // borrow of self keeps a decode from happening meanwhile.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), i);
            if p.is_null() {
                return &[];
            }
            std::slice::from_raw_parts(p, n)
        }
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: `self.ptr` is a live context; the handle lives as long as it.
        unsafe { sys::llama_get_memory(self.ptr.as_ptr()) }
    }

    /// How many positions of `seq` the KV holds (always a prefix `0..n`).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        // SAFETY: the memory handle lives as long as the context.
        let max = unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq) };
        (max + 1).max(0) as usize
    }

    /// Drop positions `from..` of `seq`. Returns false when the memory
    /// cannot drop a partial range (recurrent models); the caller then
    /// clears the sequence.
    pub fn seq_truncate(&mut self, seq: SeqId, from: usize) -> bool {
        // SAFETY: plain call on a live memory handle.
        unsafe { sys::llama_memory_seq_rm(self.memory(), seq, from as i32, -1) }
    }

    /// Drop every position of `seq`.
    pub fn seq_clear(&mut self, seq: SeqId) {
        // SAFETY: plain call on a live memory handle; a full removal always
        // succeeds.
        unsafe {
            sys::llama_memory_seq_rm(self.memory(), seq, -1, -1);
        }
    }

    /// Make `dst` hold positions `0..n` of `src`: in the unified buffer the
    /// cells are shared, not copied (no compute, no new cells).
    pub fn seq_copy(&mut self, src: SeqId, dst: SeqId, n: usize) {
        // SAFETY: both ids are below n_seq_max (checked by the caller's
        // slot table); plain call on a live memory handle.
        unsafe { sys::llama_memory_seq_cp(self.memory(), src, dst, 0, n as i32) }
    }

    pub fn kv_clear(&mut self) {
        // SAFETY: plain call on a live memory handle.
        unsafe { sys::llama_memory_clear(self.memory(), true) }
    }

    /// Copy one sequence's KV state out (for a snapshot).
    pub fn seq_state_get(&self, seq: SeqId) -> Vec<u8> {
        // SAFETY: the buffer is sized by llama.cpp's own size query and the
        // write is bounded by it.
        unsafe {
            let size = sys::llama_state_seq_get_size(self.ptr.as_ptr(), seq);
            let mut buf = vec![0u8; size];
            let n = sys::llama_state_seq_get_data(self.ptr.as_ptr(), buf.as_mut_ptr(), size, seq);
            buf.truncate(n);
            buf
        }
    }

    /// Replace one sequence's KV state with a snapshot. False when
    /// llama.cpp refuses it (wrong shape, no room); the sequence is then
    /// empty.
    pub fn seq_state_set(&mut self, seq: SeqId, state: &[u8]) -> bool {
        self.seq_clear(seq);
        // SAFETY: llama.cpp reads at most `state.len()` bytes and validates
        // what it reads.
        let n = unsafe {
            sys::llama_state_seq_set_data(self.ptr.as_ptr(), state.as_ptr(), state.len(), seq)
        };
        if n == 0 {
            self.seq_clear(seq);
        }
        n != 0
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: both were allocated in `new` and are freed once, here; the
        // abort data (`_abort`) is dropped after, so no callback sees it freed.
        unsafe {
            sys::llama_batch_free(self.batch);
            sys::llama_free(self.ptr.as_ptr());
        }
    }
}

impl Model {
    /// The texts of the vocabulary's control tokens (`<|im_end|>`,
    /// `<｜end▁of▁sentence｜>`): the markup that tokenizing with
    /// `parse_special` turns into control tokens. Client text containing
    /// one must be tokenized as plain text (see `chat::prompt`).
    pub fn control_token_texts(&self) -> Vec<String> {
        let n = self.n_vocab();
        let mut out = Vec::new();
        for id in 0..n {
            // SAFETY: `self.vocab` is the loaded model's vocabulary, valid until the
            // model is freed (Drop, with the last Arc); this call only reads it.
            let attr = unsafe { sys::llama_vocab_get_attr(self.vocab(), id) };
            if attr
                & (sys::LLAMA_TOKEN_ATTR_CONTROL | sys::LLAMA_TOKEN_ATTR_UNKNOWN)
                    as sys::llama_token_attr
                != 0
            {
                let text = String::from_utf8_lossy(&self.piece(id, true)).into_owned();
                if !text.is_empty() {
                    out.push(text);
                }
            }
        }
        out
    }
}

impl Model {
    /// The tokenizer's kind (llama.cpp's `llama_vocab_type`: SPM, BPE,
    /// WPM, ...), for telling whether two models share a vocabulary.
    pub fn vocab_kind(&self) -> i32 {
        // SAFETY: plain read of the vocabulary, which lives as long as the
        // model.
        unsafe { sys::llama_vocab_type(self.vocab()) as i32 }
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<Token> {
        // SAFETY: plain read of the vocabulary.
        let t = unsafe { sys::llama_vocab_eos(self.vocab()) };
        (t >= 0).then_some(t)
    }
}
