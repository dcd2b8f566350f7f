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
mod lookup;

pub(in crate::engine) use lookup::LOOKBACK;
pub use lookup::{draft, guess, Guess, VOTE_DEPTHS};

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

/// A drafted token's chance of acceptance after a verified step kept the
/// first `accepted` of `drafted` tokens (a moving estimate, per judged
/// token).
fn judged(mut alpha: f64, drafted: usize, accepted: usize) -> f64 {
    for _ in 0..accepted {
        alpha += ALPHA_WEIGHT * (1.0 - alpha);
    }
    if accepted < drafted {
        alpha -= ALPHA_WEIGHT * alpha;
    }
    alpha
}

/// What the engine has learned of each kind of draft over all its
/// sequences. A new sequence starts from it instead of probing kinds
/// again that earlier requests measured: an agent's next turn copies as
/// the last one did, and a reply too short to finish probing (a few
/// words that echo the request) is drafted from its first steps.
#[derive(Debug, Clone, Default)]
pub struct SpecPrior {
    alpha: [Option<f64>; 1 + KINDS.len()],
    /// The lookup depths' yields as the sequence judged last saw them.
    yields: Option<[Yield; VOTE_DEPTHS.len()]>,
}

impl SpecPrior {
    /// A verified step of a sequence whose last draft was of `kind`
    /// ([`SpecState::kind`]).
    pub fn learn(&mut self, kind: usize, drafted: usize, accepted: usize) {
        if drafted > 0 {
            let a = &mut self.alpha[kind];
            *a = Some(judged(a.unwrap_or(PRIOR), drafted, accepted));
        }
    }

    /// A sequence judged its lookup depths' drafts: the next sequence
    /// starts with the depth it found paying better.
    pub fn learn_depths(&mut self, state: &SpecState) {
        if state.judged {
            self.yields = Some(state.yields);
        }
    }
}

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

/// Weight of each step in a lookup depth's moving yield.
const YIELD_WEIGHT: f64 = 0.1;

/// What drafting with one lookup depth has been worth to a sequence, had
/// its drafts been the ones verified: moving tokens per step, and moving
/// seconds per step (from the step cost model; rows, when not measured).
#[derive(Debug, Clone, Copy)]
struct Yield {
    tokens: f64,
    secs: f64,
}

/// The drafts every lookup depth proposed for one step, waiting for the
/// tokens they guessed to be decoded.
#[derive(Debug, Clone)]
struct Judging {
    /// The sequence position of the drafts' first token.
    at: usize,
    drafts: [Vec<Token>; VOTE_DEPTHS.len()],
    cost: (f64, f64),
}

/// Steps whose drafts may wait to be judged: a draft is judged within
/// `--draft-max` decoded tokens.
const JUDGING: usize = 64;

/// One sequence's drafting record.
#[derive(Debug, Clone)]
pub struct SpecState {
    pub drafted: u32,
    pub accepted: u32,
    /// A draft model's guesses, then lookup matches by length (`KINDS`).
    kinds: [Kind; 1 + KINDS.len()],
    /// The kind of the draft being verified.
    last: usize,
    /// Each lookup depth's yield (`VOTE_DEPTHS`).
    yields: [Yield; VOTE_DEPTHS.len()],
    judging: std::collections::VecDeque<Judging>,
    /// Started from the engine's [`SpecPrior`].
    seeded: bool,
    /// Some lookup drafts were judged.
    judged: bool,
}

impl Default for SpecState {
    fn default() -> Self {
        Self {
            drafted: 0,
            accepted: 0,
            kinds: std::array::from_fn(|_| Kind::new(PRIOR)),
            last: 0,
            yields: [Yield {
                tokens: 1.0,
                secs: 1.0,
            }; VOTE_DEPTHS.len()],
            judging: Default::default(),
            seeded: false,
            judged: false,
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

    /// Start from what the engine learned of each kind of draft (once,
    /// before the sequence's first draft): a kind measured before starts
    /// at its acceptance, without a probe.
    pub fn seed(&mut self, prior: &SpecPrior) {
        if std::mem::replace(&mut self.seeded, true) {
            return;
        }
        if let Some(yields) = prior.yields {
            self.yields = yields;
        }
        for (kind, alpha) in self.kinds.iter_mut().zip(prior.alpha) {
            if let Some(alpha) = alpha {
                *kind = Kind {
                    probe: false,
                    ..Kind::new(alpha)
                };
            }
        }
    }

    /// The kind of the draft last sized, for [`SpecPrior::learn`].
    pub fn kind(&self) -> usize {
        self.last
    }

    /// Which of [`VOTE_DEPTHS`] drafts this step: the one that has been
    /// paying better (the shallow one while they tie).
    pub fn lookup(&self) -> usize {
        (0..VOTE_DEPTHS.len())
            .rev()
            .max_by(|&a, &b| {
                let rate = |y: &Yield| y.tokens / y.secs.max(1e-9);
                rate(&self.yields[a]).total_cmp(&rate(&self.yields[b]))
            })
            .unwrap_or(0)
    }

    /// The drafts every lookup depth proposes for the step whose first
    /// drafted token is at sequence position `at` (one of them is
    /// verified), judged by [`SpecState::judge_lookups`] once what they
    /// guessed is decoded; steps cost `cost` (None: not measured yet, rows
    /// are then counted instead).
    pub fn proposed(
        &mut self,
        at: usize,
        drafts: [Vec<Token>; VOTE_DEPTHS.len()],
        cost: Option<(f64, f64)>,
    ) {
        // A step planned again (it did not run) proposes anew.
        self.judging.retain(|j| j.at < at);
        if self.judging.len() == JUDGING {
            self.judging.pop_front();
        }
        self.judging.push_back(Judging {
            at,
            drafts,
            cost: cost.unwrap_or((0.0, 1.0)),
        });
    }

    /// A step was verified: the sequence now holds `tokens`, and `next`
    /// comes after them when the reply goes on. Each waiting step's drafts
    /// are judged once it is known how far each agrees with what was
    /// decoded (a draft longer than the verified one is judged on the
    /// tokens later steps decode, so a depth that drafts further is not
    /// judged by the other's shorter draft): tokens a step would have
    /// gained against the rows it would have cost.
    pub fn judge_lookups(&mut self, tokens: &[Token], next: Option<Token>) {
        let known = |q: usize| match q.cmp(&tokens.len()) {
            std::cmp::Ordering::Less => Some(tokens[q]),
            std::cmp::Ordering::Equal => next,
            std::cmp::Ordering::Greater => None,
        };
        // How far a draft at `at` agrees, if that is known yet.
        let agreed = |at: usize, d: &[Token]| {
            for (k, &t) in d.iter().enumerate() {
                match known(at + k) {
                    Some(x) if x == t => continue,
                    Some(_) => return Some(k),
                    None => return None,
                }
            }
            Some(d.len())
        };
        let mut i = 0;
        while i < self.judging.len() {
            let j = &self.judging[i];
            let judged: Option<Vec<usize>> = j.drafts.iter().map(|d| agreed(j.at, d)).collect();
            // A reply that ended leaves nothing more to learn.
            let Some(judged) = judged.or_else(|| next.is_none().then(Vec::new)) else {
                i += 1;
                continue;
            };
            let j = self.judging.remove(i).expect("in range");
            self.judged = true;
            let (base, per_row) = j.cost;
            for ((y, d), agreed) in self.yields.iter_mut().zip(&j.drafts).zip(judged) {
                let tokens = 1.0 + agreed as f64;
                let secs = base + per_row * (1 + d.len()) as f64;
                y.tokens += YIELD_WEIGHT * (tokens - y.tokens);
                y.secs += YIELD_WEIGHT * (secs - y.secs);
            }
        }
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
        kind.alpha = judged(kind.alpha, drafted, accepted);
        if accepted * 2 >= drafted {
            // Drafts pay again: a later cooldown starts short.
            kind.next_cooldown = COOLDOWN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sequence_drafts_with_the_depth_that_pays() {
        let mut s = SpecState::default();
        assert_eq!(s.lookup(), 0);
        // The deep vote's drafts are right, the shallow one's stop early:
        // more tokens a step for a few more rows. The shallow draft is
        // verified (one token accepted), the deep one is judged on what the
        // next steps decode.
        let mut seq: Vec<Token> = vec![1, 2, 3];
        for _ in 0..10 {
            let at = seq.len();
            s.proposed(at, [vec![7], vec![7, 8, 9, 10]], CPU);
            seq.push(7);
            s.judge_lookups(&seq, Some(8));
            seq.extend([8, 9, 10]);
            s.judge_lookups(&seq, Some(11));
            seq.push(11);
        }
        assert!(s.judging.is_empty());
        assert_eq!(s.lookup(), 1);
        // Then the deep one's guesses go wrong while the shallow one's
        // short drafts are right: rows for nothing.
        for _ in 0..30 {
            let at = seq.len();
            s.proposed(at, [vec![5, 6], vec![1, 2, 3, 4]], CPU);
            seq.extend([5, 6]);
            s.judge_lookups(&seq, Some(0));
            seq.push(0);
        }
        assert_eq!(s.lookup(), 0);
        // A step planned again proposes anew; a reply that ends judges
        // nothing more.
        let at = seq.len();
        s.proposed(at, [vec![1], vec![1, 2]], CPU);
        s.proposed(at, [vec![3], vec![3, 4]], CPU);
        assert_eq!(s.judging.len(), 1);
        let before = s.yields.map(|y| y.tokens);
        s.judge_lookups(&seq, None);
        assert!(s.judging.is_empty());
        assert_eq!(s.yields.map(|y| y.tokens), before);
    }

    #[test]
    fn a_new_sequence_starts_from_what_earlier_ones_measured() {
        let mut prior = SpecPrior::default();
        // The first sequence probes a long match, then learns it copies.
        let mut first = SpecState::default();
        first.seed(&prior);
        assert_eq!(first.draft_len(Some(20), 8, 1, CPU, 0.0), PROBE);
        first.record(PROBE, PROBE);
        prior.learn(first.kind(), PROBE, PROBE);
        for _ in 0..30 {
            first.draft_len(Some(20), 8, 1, CPU, 0.0);
            first.record(8, 8);
            prior.learn(first.kind(), 8, 8);
        }
        assert_eq!(first.draft_len(Some(20), 8, 1, CPU, 0.0), 8);
        // The next one drafts a long match whole from its first step, and
        // still probes the kinds nobody measured.
        let mut next = SpecState::default();
        next.seed(&prior);
        assert_eq!(next.draft_len(Some(20), 8, 1, CPU, 0.0), 8);
        assert_eq!(next.draft_len(Some(2), 8, 1, CPU, 0.0), PROBE);
        // It also starts with the lookup depth the last judged sequence
        // found paying better.
        let mut deep = SpecState::default();
        for k in 0..10 {
            deep.proposed(2 * k, [vec![], vec![1, 2]], CPU);
            deep.judge_lookups(&[1, 2].repeat(k + 1), Some(1));
        }
        assert_eq!(deep.lookup(), 1);
        prior.learn_depths(&deep);
        let mut after = SpecState::default();
        after.seed(&prior);
        assert_eq!(after.lookup(), 1);
        // Seeding happens once: a sequence's own record is not reset.
        next.record(PROBE, 0);
        next.seed(&prior);
        assert_eq!(next.kinds[1].alpha, judged(PRIOR, PROBE, 0));
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
