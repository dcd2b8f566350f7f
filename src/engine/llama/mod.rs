//! A thin safe layer over llama.cpp's C API (`llama-cpp-sys-2`).
//!
//! The safe `llama-cpp-2` crate hides the raw context, and with it the two
//! things hearth is built on: the abort callback that llama.cpp's CPU
//! backend calls after every graph node (how a client that leaves stops a
//! prefill chunk half-way, and where fault injection stalls), and direct
//! control of the KV memory. So this module owns those pointers itself and
//! exposes only what the worker needs.

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

mod context;
mod log;
pub mod rpc;

pub use context::{AbortFn, Context, ContextParams, FlashAttn, Row, SeqId};
pub(crate) use log::capture_log;
use log::init_backend;

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

/// How much of a GGUF a load reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Full,
    Probe,
}

/// How a model's layers are spread over the devices (`--tensor-split`):
/// set once per process, before the first load.
static TENSOR_SPLIT: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();

/// Spread the layers of every model this process loads over its devices
/// (GPUs and RPC workers, in llama.cpp's device order) in these
/// proportions. The first call wins.
pub fn set_tensor_split(split: Vec<f32>) {
    let _ = TENSOR_SPLIT.set(split);
}

impl Model {
    /// Load a GGUF file. `n_gpu_layers` is ignored by CPU builds.
    pub fn load(path: &Path, n_gpu_layers: i32) -> Result<Arc<Model>, LlamaError> {
        Self::load_with(path, n_gpu_layers, Load::Full)
    }

    /// Read a GGUF's metadata and tensor index without allocating or
    /// reading its weights (llama.cpp's `no_alloc`): what a context over
    /// it would take can be measured before the real load
    /// ([`Context::probe_sizes`]). Such a model cannot compute.
    pub fn probe(path: &Path, n_gpu_layers: i32) -> Result<Arc<Model>, LlamaError> {
        Self::load_with(path, n_gpu_layers, Load::Probe)
    }

    /// Read a GGUF's metadata, hyperparameters and vocabulary without its
    /// weights ([`Model::probe`] on the CPU): enough to tokenize, render
    /// templates and validate grammars, in a process that never computes.
    /// (llama.cpp's `vocab_only` would leave the hyperparameters unread.)
    pub fn load_vocab(path: &Path) -> Result<Arc<Model>, LlamaError> {
        Self::load_with(path, 0, Load::Probe)
    }

    fn load_with(path: &Path, n_gpu_layers: i32, load: Load) -> Result<Arc<Model>, LlamaError> {
        let no_alloc = load == Load::Probe;
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
        params.no_alloc = no_alloc;
        // llama.cpp reads `llama_max_devices()` proportions from it.
        let split = TENSOR_SPLIT.get().map(|s| {
            let mut v = s.clone();
            v.resize(rpc::max_devices().max(s.len()), 0.0);
            v
        });
        if let Some(split) = &split {
            params.tensor_split = split.as_ptr();
        }
        if no_alloc {
            // llama.cpp's measuring pass maps nothing.
            params.load_mode = sys::LLAMA_LOAD_MODE_NONE;
            params.lazy_mode = sys::LLAMA_LAZY_MODE_OFF;
        }
        if cpu_has_amx() && load == Load::Full {
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
        self.n_swa() > 0
    }

    /// The attention window of the sliding-window layers (0: none).
    pub fn n_swa(&self) -> u32 {
        // SAFETY: `self.ptr` is a loaded model, valid until Drop; a read-only getter.
        unsafe { sys::llama_model_n_swa(self.ptr.as_ptr()) }.max(0) as u32
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

/// Free memory on the GPUs llama.cpp found (0 on CPU-only builds), in bytes.
pub fn gpu_free_bytes() -> u64 {
    init_backend();
    let mut sum = 0u64;
    // SAFETY: the device registry is initialised by `init_backend`; each
    // index below the count names a registered device, and the memory query
    // writes two plain integers.
    unsafe {
        for i in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(i);
            let kind = sys::ggml_backend_dev_type(dev);
            if kind == sys::GGML_BACKEND_DEVICE_TYPE_GPU
                || kind == sys::GGML_BACKEND_DEVICE_TYPE_IGPU
            {
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                sum += free as u64;
            }
        }
    }
    sum
}
