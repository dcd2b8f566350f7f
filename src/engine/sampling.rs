//! Sampling parameters and the llama.cpp sampler chain built from them.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::llama::{Context, Token};

/// How to pick each next token. Defaults are the official APIs' own
/// (temperature 1, no truncation).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy: always the most likely token.
    pub temperature: f32,
    /// Nucleus sampling; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: i32,
    /// Drop tokens less likely than `min_p` times the best one; 0 disables it.
    pub min_p: f32,
    /// Fixed seed for reproducible sampling; random when absent.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, min_p: 0.0, seed: None }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// An owned llama.cpp sampler chain.
pub struct Sampler(NonNull<sys::llama_sampler>);

// SAFETY: a sampler is plain data used by one thread at a time.
unsafe impl Send for Sampler {}

impl Sampler {
    /// The chain in llama.cpp's usual order: truncation (top-k, top-p,
    /// min-p), then temperature, then a seeded draw. Greedy skips it all.
    pub fn new(params: &SamplingParams) -> Sampler {
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain, s);
            if params.is_greedy() {
                add(sys::llama_sampler_init_greedy());
            } else {
                if params.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(params.top_k));
                }
                if params.top_p < 1.0 {
                    add(sys::llama_sampler_init_top_p(params.top_p, 1));
                }
                if params.min_p > 0.0 {
                    add(sys::llama_sampler_init_min_p(params.min_p, 1));
                }
                add(sys::llama_sampler_init_temp(params.temperature));
                let seed = params.seed.map(|s| s as u32).unwrap_or_else(rand_seed);
                add(sys::llama_sampler_init_dist(seed));
            }
            Sampler(NonNull::new(chain).expect("llama_sampler_chain_init returned null"))
        }
    }

    /// Pick the next token from the context's last logits (and record it
    /// in the chain's state).
    pub fn sample(&mut self, ctx: &Context) -> Token {
        unsafe { sys::llama_sampler_sample(self.0.as_ptr(), ctx.raw(), -1) }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        unsafe { sys::llama_sampler_free(self.0.as_ptr()) }
    }
}

fn rand_seed() -> u32 {
    // The low bits of a v4 UUID are uniformly random; no extra crate needed.
    (uuid::Uuid::new_v4().as_u128() & 0xffff_ffff) as u32
}
