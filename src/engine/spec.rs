//! Speculative decoding by prompt lookup: what a coding agent writes is
//! often text it has seen (the file it rewrites, the lines it quotes, paths
//! and identifiers), so the tokens that followed the last occurrence of the
//! sequence's latest n-gram are a good guess at what comes next.
//!
//! A decoding sequence's draft rides in the same step as its pending token,
//! as extra rows of its sequence; the step verifies them by sampling each
//! row in turn (`Running::sample`) and keeps the drafted tokens for as long
//! as the sampled ones equal them. For a draft that is one fixed guess,
//! "sample from the target distribution and compare" is the speculative
//! sampling rule itself (accept with probability p(draft), else draw from p
//! without it), so sampled output keeps the model's distribution and greedy
//! output its tokens; grammars, stops and budgets see every token as they
//! do without speculation.
//!
//! Pure functions: the lookup and the per-sequence adaptive state.

use super::llama::Token;

/// How drafting is set up (`--draft-max`, `--no-spec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecConfig {
    /// Most tokens drafted per step.
    pub draft_max: usize,
    /// Fewest tokens drafted per step, whatever drafts are measured to
    /// cost (0: as many as pay, possibly none).
    pub draft_min: usize,
    /// Longest match measured, and the shortest n-gram looked up.
    pub ngram_max: usize,
    pub ngram_min: usize,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self {
            draft_max: 12,
            draft_min: 0,
            ngram_max: 24,
            ngram_min: 2,
        }
    }
}

/// Only this many most recent tokens are searched: a lookup is a linear
/// scan per step.
pub(super) const LOOKBACK: usize = 16384;

/// What prompt lookup found: the guess starts at `tokens[start]`, after an
/// earlier stretch that equals the last `matched` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub start: usize,
    pub matched: usize,
}

/// The earlier occurrence of the sequence's end that matches it longest
/// (at least `ngram_min` tokens, measured up to `ngram_max`; the most
/// recent of equally long ones) and has a token after it. How long the
/// match is says how far the guess can be trusted: twelve tokens that
/// repeat a stretch of the prompt are copying it, two may be chance.
pub fn lookup(tokens: &[Token], cfg: &SpecConfig) -> Option<Found> {
    let len = tokens.len();
    let n = cfg.ngram_min.max(1);
    if len <= n {
        return None;
    }
    let cap = cfg.ngram_max.max(n);
    let from = len.saturating_sub(LOOKBACK);
    let suffix = &tokens[len - n..];
    let mut best: Option<Found> = None;
    // Occurrences starting at i, ending before the suffix's own start.
    for i in (from..len - n).rev() {
        if &tokens[i..i + n] != suffix {
            continue;
        }
        let end = i + n;
        let matched = n
            + (n..cap)
                .take_while(|&m| m < end && tokens[end - m - 1] == tokens[len - m - 1])
                .count();
        if best.is_none_or(|b| matched > b.matched) {
            best = Some(Found {
                start: end,
                matched,
            });
            if matched == cap {
                break;
            }
        }
    }
    best
}

/// Drafts are judged apart by where they come from: a draft model, or a
/// lookup match of at least this many tokens (index + 1).
const KINDS: [usize; 4] = [0, 4, 8, 16];
/// Acceptance assumed for a kind of draft before any of it was judged: on
/// a CPU, too low for a draft to pay, so each kind is probed and measured
/// before its drafts are trusted (and a request's first steps are the same
/// whatever the step costs measured so far).
const PRIOR: f64 = 0.6;
/// Weight of each newly judged drafted token in the moving acceptance.
const ALPHA_WEIGHT: f64 = 0.1;
/// Chances a kind of draft goes undrafted when no draft of it pays for
/// its rows; doubles each time it happens again, up to `MAX_COOLDOWN`.
const COOLDOWN: u32 = 16;
const MAX_COOLDOWN: u32 = 256;
/// Tokens drafted to probe again after a cooldown.
const PROBE: usize = 2;

/// The record of one kind of draft.
#[derive(Debug, Clone)]
struct Kind {
    /// The chance that a drafted token is accepted, given the ones before
    /// it were (moving, per judged token).
    alpha: f64,
    /// Chances left without drafting.
    cooldown: u32,
    /// The next cooldown's length.
    next_cooldown: u32,
    /// The cooldown just ended: draft a little to measure again.
    probe: bool,
}

impl Kind {
    /// A kind never judged: its first draft is a probe.
    fn new(alpha: f64) -> Kind {
        Kind {
            alpha,
            cooldown: 0,
            next_cooldown: COOLDOWN,
            probe: true,
        }
    }
}

/// One sequence's drafting record.
#[derive(Debug, Clone)]
pub struct SpecState {
    pub drafted: u32,
    pub accepted: u32,
    /// A draft model's guesses, then lookup matches by length (`KINDS`).
    kinds: [Kind; 1 + KINDS.len()],
    /// The kind of the draft being verified.
    last: usize,
}

impl Default for SpecState {
    fn default() -> Self {
        Self {
            drafted: 0,
            accepted: 0,
            kinds: std::array::from_fn(|_| Kind::new(PRIOR)),
            last: 0,
        }
    }
}

/// Expected accepted tokens of a `k`-token draft when each is accepted with
/// chance `alpha` once the ones before it were.
fn expected(alpha: f64, k: usize) -> f64 {
    (1..=k as i32).map(|i| alpha.powi(i)).sum()
}

/// Which record judges a draft: a draft model's (`None`), or that of
/// lookup matches as long as `matched`.
fn kind_of(matched: Option<usize>) -> usize {
    match matched {
        None => 0,
        Some(m) => KINDS.iter().rposition(|&min| m >= min).unwrap_or(0) + 1,
    }
}

impl SpecState {
    /// How many tokens to draft this step, at most `max`, for a draft of a
    /// draft model (`matched` None) or of a lookup match that long: the
    /// length that gives the most tokens per second for a step of
    /// `sequences` decoding sequences, with steps costing `cost` = (base,
    /// per row) seconds (None: not measured yet; rows are then taken as
    /// free) and each drafted token `price` seconds to draft (a draft
    /// model's step; 0 for prompt lookup). 0: do not draft.
    pub fn draft_len(
        &mut self,
        matched: Option<usize>,
        max: usize,
        sequences: usize,
        cost: Option<(f64, f64)>,
        price: f64,
    ) -> usize {
        self.last = kind_of(matched);
        let kind = &mut self.kinds[self.last];
        if max == 0 {
            return 0;
        }
        if kind.cooldown > 0 {
            kind.cooldown -= 1;
            kind.probe = kind.cooldown == 0;
            return 0;
        }
        if std::mem::take(&mut kind.probe) {
            return PROBE.min(max);
        }
        let Some((base, per_row)) = cost else {
            return max;
        };
        let n = sequences.max(1) as f64;
        let step = base + per_row * n;
        let alpha = kind.alpha;
        let rate = |k: usize| (n + expected(alpha, k)) / (step + (per_row + price) * k as f64);
        let best = (0..=max)
            .max_by(|&a, &b| rate(a).total_cmp(&rate(b)))
            .unwrap_or(0);
        if best == 0 {
            kind.cooldown = kind.next_cooldown;
            kind.next_cooldown = (kind.next_cooldown * 2).min(MAX_COOLDOWN);
        }
        best
    }

    /// A verified step: the first `accepted` of `drafted` tokens of the
    /// draft last sized by [`SpecState::draft_len`] were kept.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted as u32;
        self.accepted += accepted as u32;
        let kind = &mut self.kinds[self.last];
        for _ in 0..accepted {
            kind.alpha += ALPHA_WEIGHT * (1.0 - kind.alpha);
        }
        if accepted < drafted {
            kind.alpha -= ALPHA_WEIGHT * kind.alpha;
        }
        if accepted * 2 >= drafted {
            // Drafts pay again: a later cooldown starts short.
            kind.next_cooldown = COOLDOWN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tokens that followed the longest-matching earlier occurrence of
    /// the end of `tokens`, at most `max` of them.
    fn propose(tokens: &[Token], cfg: &SpecConfig, max: usize) -> Vec<Token> {
        match lookup(tokens, cfg) {
            Some(f) if max > 0 => tokens[f.start..(f.start + max).min(tokens.len())].to_vec(),
            _ => Vec::new(),
        }
    }

    fn cfg() -> SpecConfig {
        SpecConfig {
            draft_max: 8,
            draft_min: 0,
            ngram_max: 3,
            ngram_min: 1,
        }
    }

    #[test]
    fn the_longest_recent_ngram_proposes_what_followed_it() {
        // "a b c d e ... a b c" -> "d e"
        let t = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(propose(&t, &cfg(), 2), vec![4, 5]);
        assert_eq!(propose(&t, &cfg(), 8), vec![4, 5, 9, 9, 1, 2, 3]);
        // The most recent occurrence wins.
        let t = [1, 2, 7, 1, 2, 8, 1, 2];
        assert_eq!(propose(&t, &cfg(), 1), vec![8]);
    }

    #[test]
    fn the_longest_match_wins_over_a_more_recent_shorter_one() {
        // "1 2 3 4 | 5": the end "1 2 3 4" matches it whole; "9 3 4 | 6",
        // more recent, only its last two tokens.
        let t = [1, 2, 3, 4, 5, 0, 9, 3, 4, 6, 7, 1, 2, 3, 4];
        let two = SpecConfig {
            ngram_min: 2,
            ngram_max: 24,
            ..cfg()
        };
        assert_eq!(
            lookup(&t, &two),
            Some(Found {
                start: 4,
                matched: 4
            })
        );
        assert_eq!(propose(&t, &two, 2), vec![5, 0]);
        // The match is measured no further than ngram_max.
        let short = SpecConfig {
            ngram_max: 3,
            ..two
        };
        assert_eq!(lookup(&t, &short).map(|f| f.matched), Some(3));
        // A stretch that repeats itself matches as far as the cap.
        let t: Vec<Token> = (0..40).map(|i| i % 3).collect();
        assert_eq!(lookup(&t, &two).map(|f| f.matched), Some(24));
    }

    #[test]
    fn shorter_ngrams_are_tried_when_longer_ones_miss() {
        let t = [5, 6, 1, 7, 8, 1];
        assert_eq!(propose(&t, &cfg(), 2), vec![7, 8]);
        let two = SpecConfig {
            ngram_min: 2,
            ..cfg()
        };
        assert!(propose(&t, &two, 2).is_empty());
        assert!(propose(&[1, 2, 3], &cfg(), 4).is_empty());
        assert!(propose(&[], &cfg(), 4).is_empty());
        assert!(propose(&[1, 1, 1], &cfg(), 0).is_empty());
    }

    /// Steps cost 7 ms plus 4 ms a row: a small model on two CPU cores.
    const CPU: Option<(f64, f64)> = Some((0.007, 0.004));
    /// A lookup match of 4 to 7 tokens (assumed accepted at 0.6).
    const M: Option<usize> = Some(4);

    #[test]
    fn the_draft_length_follows_acceptance_and_cost() {
        let mut s = SpecState::default();
        // A kind of draft never judged is probed first.
        assert_eq!(s.draft_len(Some(4), 8, 1, CPU, 0.0), PROBE);
        s.record(PROBE, 1);
        // Step costs not measured yet: rows are free, draft all.
        assert_eq!(s.draft_len(Some(4), 8, 1, None, 0.0), 8);
        // Acceptance about 0.6 on a CPU: one token pays, more do not.
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 1);
        // Acceptance about 0.8: a few tokens pay.
        for _ in 0..20 {
            s.record(5, 4);
        }
        let some = s.draft_len(M, 8, 1, CPU, 0.0);
        assert!((2..=5).contains(&some), "{some}");
        // Copying text: everything accepted, the longest draft pays most.
        for _ in 0..40 {
            s.record(4, 4);
        }
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 8);
        // On a GPU, rows are nearly free: the whole draft.
        assert_eq!(s.draft_len(M, 8, 1, Some((0.010, 0.00001)), 0.0), 8);
        // Four sequences already fill the step well: a 0.6 draft does not pay.
        let mut four = SpecState::default();
        assert_eq!(four.draft_len(M, 8, 4, CPU, 0.0), PROBE);
        four.record(PROBE, 1);
        assert_eq!(four.draft_len(M, 8, 4, CPU, 0.0), 0);
    }

    #[test]
    fn a_draft_model_that_costs_as_much_as_a_row_drafts_less() {
        let mut s = SpecState::default();
        s.draft_len(None, 8, 1, CPU, 0.0);
        for _ in 0..20 {
            s.record(5, 4);
        }
        let free = s.draft_len(None, 8, 1, CPU, 0.0);
        let priced = s.draft_len(None, 8, 1, CPU, 0.004);
        assert!(priced < free, "{priced} vs {free}");
        // Guesses as dear as the target's own step never pay.
        assert_eq!(s.draft_len(None, 8, 1, CPU, 0.011), 0);
    }

    #[test]
    fn failing_drafts_cool_down_then_probe() {
        let mut s = SpecState::default();
        s.draft_len(M, 8, 1, CPU, 0.0);
        for _ in 0..10 {
            s.record(2, 0);
        }
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 0);
        let skipped = (0..COOLDOWN)
            .filter(|_| s.draft_len(M, 8, 1, CPU, 0.0) == 0)
            .count();
        assert_eq!(skipped as u32, COOLDOWN);
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), PROBE);
        s.record(2, 0);
        // Still failing: twice as long a pause.
        assert_eq!(s.draft_len(M, 8, 1, CPU, 0.0), 0);
        assert_eq!(
            (0..2 * COOLDOWN)
                .filter(|_| s.draft_len(M, 8, 1, CPU, 0.0) == 0)
                .count() as u32,
            2 * COOLDOWN
        );
        assert_eq!((s.drafted, s.accepted), (22, 0));
    }

    #[test]
    fn long_matches_are_judged_apart_from_short_ones() {
        let mut s = SpecState::default();
        // Drafts after a match of twenty tokens (copying the prompt) are
        // accepted whole, those after two-token matches rejected.
        for _ in 0..20 {
            s.draft_len(Some(20), 8, 1, None, 0.0);
            s.record(4, 4);
            s.draft_len(Some(2), 8, 1, None, 0.0);
            s.record(2, 0);
        }
        // The short matches stop drafting, the long ones draft all.
        assert_eq!(s.draft_len(Some(2), 8, 1, CPU, 0.0), 0);
        assert_eq!(s.draft_len(Some(20), 8, 1, CPU, 0.0), 8);
        // Which record a draft counts in, by its match length.
        assert_eq!(
            (kind_of(None), kind_of(Some(3)), kind_of(Some(4))),
            (0, 1, 2)
        );
        assert_eq!(
            (kind_of(Some(15)), kind_of(Some(16)), kind_of(Some(99))),
            (3, 4, 4)
        );
    }
}
