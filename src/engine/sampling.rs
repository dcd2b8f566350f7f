//! Sampling parameters, the sampler (logit bias and penalties, an optional
//! grammar, then llama.cpp's chain) and log-probabilities.
//!
//! The sampler has two stages. The first changes the distribution itself:
//! logit bias, then the repetition penalties. Log-probabilities are
//! reported under that distribution, as OpenAI does (after bias and
//! penalties, before temperature and truncation). The second picks from it:
//! greedy, or truncation, temperature and a seeded draw. Penalties count
//! the tokens accepted into the sampler: generated tokens only, never the
//! prompt (OpenAI's rule), and, under speculative decoding, only drafted
//! tokens that were verified.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::grammar::GrammarError;
use super::llama::{Model, Token};
use super::Grammar;

/// llama-server's default window of `repeat_last_n`.
pub const DEFAULT_REPEAT_LAST_N: i32 = 64;

/// How to pick each next token. Defaults are the official APIs' own
/// (temperature 1, no truncation, no bias or penalty).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy: always the most likely token.
    pub temperature: f32,
    /// Nucleus sampling; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: i32,
    /// Drop tokens less likely than `min_p` times the best one; 0 disables it.
    pub min_p: f32,
    /// Locally typical sampling; 1 disables it.
    pub typical_p: f32,
    /// Fixed seed for reproducible sampling; random when absent.
    pub seed: Option<u64>,
    /// Added to a token's logit before anything else (OpenAI's
    /// `logit_bias`: -100 all but bans a token, +100 all but forces it).
    pub logit_bias: Vec<(Token, f32)>,
    /// OpenAI's penalties over every token generated so far:
    /// `logit -= count * frequency + (count > 0) * presence`.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// llama-server's multiplicative penalty (1 disables it) over the last
    /// `repeat_last_n` generated tokens (0 disables it, -1 means all).
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            typical_p: 1.0,
            seed: None,
            logit_bias: Vec::new(),
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: DEFAULT_REPEAT_LAST_N,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether bias or a penalty changes the distribution.
    fn adjusts(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
            || (self.repeat_penalty != 1.0 && self.repeat_last_n != 0)
    }

    /// The windows (in tokens) of the two penalty samplers, OpenAI's and
    /// llama-server's, for a job of at most `max_tokens` generated tokens.
    /// OpenAI's spans the whole reply; `repeat_last_n` -1 does too.
    fn penalty_windows(&self, max_tokens: u32) -> (i32, i32) {
        let all = max_tokens.clamp(1, i32::MAX as u32) as i32;
        let repeat = match self.repeat_last_n {
            n if n < 0 => all,
            n => n.min(all),
        };
        (all, repeat)
    }
}

/// The sampler of one job: bias and penalties, an optional grammar, then
/// llama.cpp's chain.
///
/// The token is picked here rather than by `llama_sampler_sample`: that
/// call accepts the token into every sampler, and a grammar that refuses
/// it throws a C++ exception, which must not unwind through Rust. Here the
/// grammar is asked first and fed only tokens it allows, through the
/// wrapper that catches exceptions.
pub struct Sampler {
    /// Logit bias and penalties (None when neutral): they shape the
    /// distribution the token is drawn from and logprobs report.
    adjust: Option<NonNull<sys::llama_sampler>>,
    chain: NonNull<sys::llama_sampler>,
    grammar: Option<NonNull<sys::llama_sampler>>,
    /// The grammar refused a token it had allowed (a llama.cpp bug): its
    /// state is gone, so nothing more is sampled.
    broken: bool,
    /// Candidate buffer, one entry per vocabulary token, reused.
    cur: Vec<sys::llama_token_data>,
    /// The current row's logits after `adjust`, in vocabulary order.
    adjusted: Vec<f32>,
}

// SAFETY: samplers are plain data used by one thread at a time.
unsafe impl Send for Sampler {}

impl Sampler {
    /// Bias and penalties first (llama.cpp's common order: logit bias,
    /// then penalties), then the grammar (when given), then the chain:
    /// truncation (top-k, typical, top-p, min-p), temperature, a seeded
    /// draw. Greedy replaces the chain with an argmax, still after bias,
    /// penalties and grammar. `max_tokens` bounds the penalties' window.
    pub fn new(
        params: &SamplingParams,
        model: &Model,
        grammar: Option<&Grammar>,
        max_tokens: u32,
    ) -> Result<Sampler, GrammarError> {
        let grammar = grammar
            .map(|g| super::grammar::init_sampler(model, g))
            .transpose()?;
        let n_vocab = model.n_vocab();
        // SAFETY: every sampler made here is owned by its chain, and each
        // chain by the returned Sampler, which frees them once (Drop). The
        // bias array is copied by llama.cpp before the call returns.
        unsafe {
            let adjust = if params.adjusts() {
                let chain =
                    sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
                let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain, s);
                let bias: Vec<sys::llama_logit_bias> = params
                    .logit_bias
                    .iter()
                    .map(|&(token, bias)| sys::llama_logit_bias { token, bias })
                    .collect();
                add(sys::llama_sampler_init_logit_bias(
                    n_vocab,
                    bias.len() as i32,
                    bias.as_ptr(),
                ));
                let (all, repeat) = params.penalty_windows(max_tokens);
                add(sys::llama_sampler_init_penalties(
                    n_vocab,
                    repeat,
                    params.repeat_penalty,
                    0.0,
                    0.0,
                ));
                add(sys::llama_sampler_init_penalties(
                    n_vocab,
                    all,
                    1.0,
                    params.frequency_penalty,
                    params.presence_penalty,
                ));
                Some(NonNull::new(chain).expect("llama_sampler_chain_init returned null"))
            } else {
                None
            };
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain, s);
            if params.is_greedy() {
                add(sys::llama_sampler_init_greedy());
            } else {
                if params.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(params.top_k));
                }
                if params.typical_p < 1.0 {
                    add(sys::llama_sampler_init_typical(params.typical_p, 1));
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
            let chain = NonNull::new(chain).expect("llama_sampler_chain_init returned null");
            Ok(Sampler {
                adjust,
                chain,
                grammar,
                broken: false,
                cur: Vec::new(),
                adjusted: Vec::new(),
            })
        }
    }

    /// Pick the next token from a row's logits and record it in
    /// the samplers' state. None when nothing can follow: the grammar
    /// allows no token (not even end-of-generation), or its state broke.
    ///
    /// As llama.cpp's common sampler does, the chain samples freely first
    /// and the grammar only checks the pick; only when it refuses is the
    /// grammar applied to the whole vocabulary and the chain run again.
    /// Greedy gets exactly the grammar-constrained argmax either way.
    pub fn sample(&mut self, logits: &[f32]) -> Option<Token> {
        if self.broken {
            return None;
        }
        if logits.is_empty() {
            return None;
        }
        let adjusted = self.adjust(logits);
        let logits = adjusted.as_deref().unwrap_or(logits);
        let picked = self.pick(logits);
        if let Some(a) = adjusted {
            self.adjusted = a;
        }
        let token = picked?;
        self.accept(token);
        (!self.broken).then_some(token)
    }

    fn pick(&mut self, logits: &[f32]) -> Option<Token> {
        let mut token = self.run_chain(logits, false)?;
        if self.grammar.is_some() && !self.allows(token) {
            token = self.run_chain(logits, true)?;
        }
        Some(token)
    }

    /// The distribution the last token was drawn from, as logits in
    /// vocabulary order: `raw` (that row's logits) after bias and
    /// penalties.
    pub fn distribution<'a>(&'a self, raw: &'a [f32]) -> &'a [f32] {
        if self.adjust.is_some() && self.adjusted.len() == raw.len() {
            &self.adjusted
        } else {
            raw
        }
    }

    /// `logits` after bias and penalties, in a buffer taken from
    /// `self.adjusted` (given back by the caller); None when neither
    /// applies.
    fn adjust(&mut self, logits: &[f32]) -> Option<Vec<f32>> {
        let a = self.adjust?;
        self.fill(logits);
        let mut arr = self.array();
        // SAFETY: `arr` points into `cur`, which outlives the call; bias
        // and penalties change logits in place, never the array's length.
        unsafe { sys::llama_sampler_apply(a.as_ptr(), &mut arr) };
        let mut out = std::mem::take(&mut self.adjusted);
        out.clear();
        out.resize(logits.len(), f32::NEG_INFINITY);
        // SAFETY: as above, `arr` lies within `cur`.
        let cands = unsafe { std::slice::from_raw_parts(arr.data, arr.size) };
        for c in cands {
            if let Some(slot) = out.get_mut(c.id as usize) {
                *slot = c.logit;
            }
        }
        Some(out)
    }

    /// Record a token the engine inserted itself (a forced end of
    /// reasoning). The grammar takes it only if it allows it: a lazy
    /// grammar still waiting for its trigger takes anything (and may be
    /// triggered by it); an active grammar is not put in a state it
    /// cannot continue from. `logits` is the row it stands for, so its
    /// logprob is reported under the same distribution as a sampled one.
    pub fn accept_forced(&mut self, token: Token, logits: &[f32]) {
        if self.broken {
            return;
        }
        if let Some(a) = self.adjust(logits) {
            self.adjusted = a;
        }
        if self.grammar.is_some() && !self.allows(token) {
            tracing::debug!(
                token,
                "forced token outside the grammar; the grammar does not see it"
            );
            self.accept_chains(token);
            return;
        }
        self.accept(token);
    }

    /// Fill the candidates from `logits`, in vocabulary order.
    fn fill(&mut self, logits: &[f32]) {
        self.cur.clear();
        self.cur.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &logit)| sys::llama_token_data {
                    id: i as Token,
                    logit,
                    p: 0.0,
                }),
        );
    }

    fn array(&mut self) -> sys::llama_token_data_array {
        sys::llama_token_data_array {
            data: self.cur.as_mut_ptr(),
            size: self.cur.len(),
            selected: -1,
            sorted: false,
        }
    }

    /// Fill the candidates from `logits`, apply the grammar when asked,
    /// then the chain; the picked token. None when the grammar leaves no
    /// candidate.
    fn run_chain(&mut self, logits: &[f32], with_grammar: bool) -> Option<Token> {
        self.fill(logits);
        let mut arr = self.array();
        if let (true, Some(g)) = (with_grammar, self.grammar) {
            // SAFETY: `arr` points into `self.cur`, which is not touched while
            // llama.cpp filters it in place; the grammar sampler is live.
            unsafe { sys::llama_sampler_apply(g.as_ptr(), &mut arr) };
            // SAFETY: apply may shrink or reorder the array, within `cur`.
            let cands = unsafe { std::slice::from_raw_parts(arr.data, arr.size) };
            if !cands.iter().any(|c| c.logit > f32::NEG_INFINITY) {
                tracing::warn!("the grammar allows no token here; generation ends");
                return None;
            }
        }
        // SAFETY: as above: `arr` points into `self.cur`; the chain is live.
        unsafe { sys::llama_sampler_apply(self.chain.as_ptr(), &mut arr) };
        if arr.selected < 0 || arr.selected as usize >= arr.size {
            return None;
        }
        // SAFETY: `selected` was checked to be within `arr.size` elements.
        let picked = unsafe { *arr.data.add(arr.selected as usize) };
        if with_grammar && picked.logit == f32::NEG_INFINITY {
            return None;
        }
        Some(picked.id)
    }

    /// Whether the grammar allows `token` next.
    fn allows(&mut self, token: Token) -> bool {
        let Some(g) = self.grammar else { return true };
        let mut one = sys::llama_token_data {
            id: token,
            logit: 1.0,
            p: 0.0,
        };
        let mut arr = sys::llama_token_data_array {
            data: &mut one,
            size: 1,
            selected: -1,
            sorted: false,
        };
        // SAFETY: `arr` is one element on this stack frame; the grammar is live.
        unsafe { sys::llama_sampler_apply(g.as_ptr(), &mut arr) };
        one.logit != f32::NEG_INFINITY
    }

    fn accept(&mut self, token: Token) {
        if let Some(g) = self.grammar {
            // SAFETY: a live grammar sampler; the wrapper catches C++ exceptions.
            let status = unsafe { sys::llama_rs_sampler_accept(g.as_ptr(), token) };
            if status != sys::LLAMA_RS_STATUS_OK {
                tracing::warn!(
                    token,
                    status,
                    "the grammar refused a token it allowed; generation ends"
                );
                self.broken = true;
            }
        }
        self.accept_chains(token);
    }

    /// Record `token` in the penalties' history and the chain's state.
    /// Only tokens that become part of the reply come here: under
    /// speculative decoding, a drafted token is sampled (and so accepted)
    /// only once every token before it has been verified.
    fn accept_chains(&mut self, token: Token) {
        // SAFETY: both chains are live until Drop.
        unsafe {
            if let Some(a) = self.adjust {
                sys::llama_sampler_accept(a.as_ptr(), token);
            }
            sys::llama_sampler_accept(self.chain.as_ptr(), token);
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: each sampler is owned here alone and freed once; a chain
        // frees the samplers added to it.
        unsafe {
            sys::llama_sampler_free(self.chain.as_ptr());
            if let Some(a) = self.adjust {
                sys::llama_sampler_free(a.as_ptr());
            }
            if let Some(g) = self.grammar {
                sys::llama_sampler_free(g.as_ptr());
            }
        }
    }
}

/// The log-probability (natural log, under the softmax of `logits`: the
/// distribution after bias and penalties) of `chosen`, and the `n` most likely tokens with theirs, best
/// first (ties: lower id first, as greedy sampling picks). NaN logits count
/// as impossible.
pub fn logprobs(logits: &[f32], chosen: Token, n: usize) -> (f32, Vec<(Token, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let n_inf = if max == f32::INFINITY {
        logits.iter().filter(|&&l| l == f32::INFINITY).count()
    } else {
        0
    };
    let lse = if max.is_finite() {
        let sum: f64 = logits
            .iter()
            .filter(|l| !l.is_nan())
            .map(|&l| ((l - max) as f64).exp())
            .sum();
        max as f64 + sum.ln()
    } else {
        0.0
    };
    let lp = |l: f32| -> f32 {
        if l.is_nan() || l == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else if n_inf > 0 {
            // Infinite logits share all the probability.
            if l == f32::INFINITY {
                -(n_inf as f32).ln()
            } else {
                f32::NEG_INFINITY
            }
        } else {
            ((l as f64 - lse) as f32).min(0.0)
        }
    };
    let chosen_lp = logits
        .get(chosen as usize)
        .copied()
        .map_or(f32::NEG_INFINITY, lp);
    let top = top_n(logits, n)
        .into_iter()
        .map(|(t, l)| (t, lp(l)))
        .collect();
    (chosen_lp, top)
}

/// The `n` largest logits with their token ids, largest first, lower id
/// first among equals. One pass over the vocabulary, no allocation beyond
/// the result.
fn top_n(logits: &[f32], n: usize) -> Vec<(Token, f32)> {
    let mut best: Vec<(Token, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || (best.len() == n && l <= best[n - 1].1) {
            continue;
        }
        // Insert after every entry >= l: equal logits keep id order.
        let at = best.partition_point(|&(_, b)| b >= l);
        best.insert(at, (i as Token, l));
        best.truncate(n);
    }
    best
}

fn rand_seed() -> u32 {
    // The low bits of a v4 UUID are uniformly random; no extra crate needed.
    (uuid::Uuid::new_v4().as_u128() & 0xffff_ffff) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn neutral_params_adjust_nothing() {
        let p = SamplingParams::default();
        assert!(!p.adjusts());
        let bias = SamplingParams {
            logit_bias: vec![(3, 0.0)],
            ..Default::default()
        };
        assert!(bias.adjusts(), "a bias of 0 is still a listed bias");
        let off_window = SamplingParams {
            repeat_penalty: 1.3,
            repeat_last_n: 0,
            ..Default::default()
        };
        assert!(!off_window.adjusts());
        for p in [
            SamplingParams {
                frequency_penalty: -0.5,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 2.0,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 1.1,
                ..Default::default()
            },
        ] {
            assert!(p.adjusts(), "{p:?}");
        }
    }

    #[test]
    fn penalty_windows_span_the_reply() {
        let p = SamplingParams::default();
        assert_eq!(p.penalty_windows(500), (500, DEFAULT_REPEAT_LAST_N));
        assert_eq!(
            p.penalty_windows(10),
            (10, 10),
            "never wider than the reply"
        );
        let all = SamplingParams {
            repeat_last_n: -1,
            ..Default::default()
        };
        assert_eq!(all.penalty_windows(300), (300, 300));
        assert_eq!(all.penalty_windows(u32::MAX), (i32::MAX, i32::MAX));
        let off = SamplingParams {
            repeat_last_n: 0,
            ..Default::default()
        };
        assert_eq!(off.penalty_windows(0), (1, 0));
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0, 0.5];
        let (lp, top) = logprobs(&logits, 1, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!(close(lp, (2.0f32.exp() / z).ln()));
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1, 0]);
        assert!(close(top[0].1, (3.0f32.exp() / z).ln()));
        assert!(close(top[1].1, lp));
        let total: f32 = logits
            .iter()
            .enumerate()
            .map(|(i, _)| logprobs(&logits, i as Token, 0).0.exp())
            .sum();
        assert!(close(total, 1.0));
    }

    #[test]
    fn top_n_is_sorted_and_capped() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 10.0)
            .collect();
        let (_, top) = logprobs(&logits, 0, 20);
        assert_eq!(top.len(), 20);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert_eq!(logits[top[0].0 as usize], sorted[0]);
        assert_eq!(logits[top[19].0 as usize], sorted[19]);
        // Fewer tokens than asked for.
        assert_eq!(logprobs(&[0.0, 1.0], 0, 5).1.len(), 2);
        assert!(logprobs(&[0.0, 1.0], 0, 0).1.is_empty());
    }

    #[test]
    fn ties_go_to_the_lower_id_as_greedy_does() {
        let (_, top) = logprobs(&[1.0, 5.0, 5.0, 5.0, 0.0], 1, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn large_and_odd_logits_stay_finite_and_non_positive() {
        let (lp, top) = logprobs(&[1000.0, 999.0, f32::NEG_INFINITY, f32::NAN], 1, 4);
        assert!(close(lp, -(1.0 + (-1.0f32).exp()).ln() - 1.0));
        assert_eq!(top.len(), 3, "NaN is left out");
        assert_eq!(top[2].1, f32::NEG_INFINITY);
        assert!(top.iter().all(|t| t.1 <= 0.0));
        let (lp, _) = logprobs(&[f32::NEG_INFINITY; 3], 0, 1);
        assert_eq!(lp, f32::NEG_INFINITY);
    }
}
