//! A llama.cpp context: batches of rows over any sequences, per-sequence KV
//! operations, logits by row, the abort callback, its thread pools.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use super::log::{kv_bytes_of, BUFFER_SIZE_LINES, KV_SIZE_LINES};
use super::{DecodeError, LlamaError, Model, Token};
use crate::engine::threads::ThreadPools;

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
    /// On a sliding-window model, give the window layers a full-size cache
    /// (every position of every sequence) instead of the window alone.
    pub swa_full: bool,
    /// Recurrent-state snapshots per sequence, so a recurrent or hybrid
    /// sequence can drop its last few positions (rejected drafts); 0: none.
    /// llama.cpp keeps 0 for architectures that cannot roll back.
    pub n_rs_seq: u32,
    /// Flash attention: llama.cpp's choice for the device, or forced.
    pub flash_attn: FlashAttn,
}

/// Whether attention runs as llama.cpp's fused flash-attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FlashAttn {
    /// Where the device supports it (llama.cpp's default).
    #[default]
    Auto,
    /// The fused kernel, where the device has one.
    On,
    /// Attention as matrix products: on a CPU, the rows of one sequence
    /// in a step (drafted tokens being verified) share each read of the
    /// KV, where the fused kernel reads it once per row. The compute
    /// buffers then hold a matrix of KV cells by batch rows.
    Off,
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
    if crate::engine::exit::exiting() {
        return true;
    }
    // SAFETY: see above; the closure is Sync, so calling it from a compute
    // thread is sound.
    let f = &*(data as *const Box<AbortFn>);
    f()
}

/// llama.cpp's parameters for a context made from `params`.
fn raw_params(model: &Model, params: &ContextParams) -> sys::llama_context_params {
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
    // position at the cost of window-layer memory growing to the full
    // context; the normal one holds each sequence's window and a batch.
    p.swa_full = params.swa_full && model.has_swa();
    p.n_rs_seq = params.n_rs_seq;
    p.flash_attn_type = match params.flash_attn {
        FlashAttn::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        FlashAttn::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttn::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
    };
    p
}

impl Context {
    pub fn new(
        model: Arc<Model>,
        params: ContextParams,
        abort: Box<AbortFn>,
    ) -> Result<Context, LlamaError> {
        let abort: Box<Box<AbortFn>> = Box::new(abort);
        let mut p = raw_params(&model, &params);
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
        crate::engine::exit::register();
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

    /// The bytes a context made from `params` would take for its KV and for
    /// its compute and output buffers, measured without allocating them
    /// (over a [`Model::probe`]); None when llama.cpp refuses the
    /// parameters.
    pub fn probe_sizes(model: &Model, params: ContextParams) -> Option<(u64, u64)> {
        let p = raw_params(model, &params);
        for lines in [&KV_SIZE_LINES, &BUFFER_SIZE_LINES] {
            if let Ok(mut lines) = lines.lock() {
                lines.clear();
            }
        }
        // SAFETY: the model outlives this call; the context is freed below
        // before returning, and nothing is computed on it.
        let raw = unsafe { sys::llama_init_from_model(model.ptr.as_ptr(), p) };
        let raw = NonNull::new(raw)?;
        let kv = KV_SIZE_LINES.lock().map(|l| kv_bytes_of(&l)).unwrap_or(0);
        let buffers = BUFFER_SIZE_LINES
            .lock()
            .map(|l| kv_bytes_of(&l))
            .unwrap_or(0);
        // SAFETY: created above, freed once, never used after.
        unsafe { sys::llama_free(raw.as_ptr()) };
        Some((kv, buffers))
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

    /// How many last positions a recurrent or hybrid sequence can drop
    /// (`n_rs_seq` as llama.cpp kept it for this architecture).
    pub fn n_rs_seq(&self) -> u32 {
        // SAFETY: `self.ptr` is a live context, valid until Drop.
        unsafe { sys::llama_n_rs_seq(self.ptr.as_ptr()) }
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
        let _computing = crate::engine::exit::computing();
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

    /// The lowest position of `seq` its memory still holds (-1 when it
    /// holds none). On a sliding-window cache of normal size, positions
    /// that fell out of the window are gone.
    pub fn seq_pos_min(&self, seq: SeqId) -> i32 {
        // SAFETY: the memory handle lives as long as the context.
        unsafe { sys::llama_memory_seq_pos_min(self.memory(), seq) }
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
