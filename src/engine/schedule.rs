//! The scheduling policy: which rows go into the next step. Pure functions
//! over what each sequence wants, so they are tested without llama.cpp
//! (DESIGN invariant 9); only the step loop (`worker`) touches the context.
//!
//! A step holds one token for every decoding sequence first, then the
//! drafted tokens those sequences want verified (speculative decoding),
//! then prefill rows of the sequences still reading their prompts, up to
//! the batch. While
//! anything is decoding, the prefill rows of a step are capped by
//! [`PrefillPacer`] so that the step takes at most about `1 + SHARE` times a
//! decode-only step: a stream decoding beside a long prefill keeps more
//! than half its speed. With nothing decoding, a prefill takes whole
//! chunks. A prefill piece never crosses a multiple of the chunk size, so
//! chunk ends fall where a cold start puts them.

/// What a running sequence wants from the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// One token (its last sampled one) to decode, and `draft` drafted
    /// tokens after it to verify.
    Decode { draft: usize },
    /// Prompt positions `next..total` still to compute.
    Prefill { next: usize, total: usize },
}

/// A running sequence, in admission order (the oldest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub slot: usize,
    pub want: Want,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Rows one step may hold (`--batch`).
    pub max_rows: usize,
    /// Prefill chunk size: pieces end on its multiples at the latest.
    pub chunk: usize,
    /// Prefill rows allowed in a step that also decodes.
    pub prefill_cap: usize,
}

/// Rows of one sequence in the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub slot: usize,
    pub rows: usize,
}

/// The next step's rows: every decode first (one each), then their drafts
/// in admission order, then prefill pieces in admission order within what
/// the batch and the cap leave.
pub fn plan_step(candidates: &[Candidate], lim: &StepLimits) -> Vec<Planned> {
    let mut drafts = Vec::new();
    let mut plan: Vec<Planned> = candidates
        .iter()
        .filter_map(|c| match c.want {
            Want::Decode { draft } => {
                drafts.push(draft);
                Some(Planned {
                    slot: c.slot,
                    rows: 1,
                })
            }
            Want::Prefill { .. } => None,
        })
        .take(lim.max_rows)
        .collect();
    let mut left = lim.max_rows - plan.len();
    for (p, draft) in plan.iter_mut().zip(drafts) {
        let extra = draft.min(left);
        p.rows += extra;
        left -= extra;
    }
    let decoding = !plan.is_empty();
    let mut room = left;
    if decoding {
        room = room.min(lim.prefill_cap.max(1));
    }
    let chunk = lim.chunk.max(1);
    for c in candidates {
        if room == 0 {
            break;
        }
        if let Want::Prefill { next, total } = c.want {
            if next >= total {
                continue;
            }
            let boundary = (next / chunk + 1) * chunk;
            let rows = room.min(boundary - next).min(total - next);
            plan.push(Planned { slot: c.slot, rows });
            room -= rows;
        }
    }
    plan
}

/// Which running sequence gives up its cells when the KV is full: the one
/// admitted last (as vLLM preempts), so the oldest requests finish first.
/// `running` is (slot, admission order).
pub fn preemption_victim(running: &[(usize, u64)]) -> Option<usize> {
    running
        .iter()
        .max_by_key(|(_, order)| *order)
        .map(|(slot, _)| *slot)
}

/// How much longer than a decode-only step a step with prefill rows may
/// take: decoding keeps `1 / (1 + SHARE)` of its speed beside a prefill.
const SHARE: f64 = 0.7;
/// A step that decodes still takes at least this many prefill rows, so a
/// prefill always advances.
const MIN_PREFILL_ROWS: usize = 8;
/// Prefill rows beside decoding before anything has been measured.
const FIRST_PREFILL_ROWS: usize = 32;
/// Weight of the newest measurement in the moving averages.
const EMA: f64 = 0.2;

/// Measures steps to size the prefill share of steps that also decode.
#[derive(Debug, Clone, Default)]
pub struct PrefillPacer {
    /// Seconds of a decode-only step (moving average).
    decode_step: Option<f64>,
    /// Seconds one prefill row adds to a step (moving average).
    per_row: Option<f64>,
}

impl PrefillPacer {
    /// A step with `decode` decode rows and `prefill` prefill rows took
    /// `secs`.
    pub fn observe(&mut self, decode: usize, prefill: usize, secs: f64) {
        if prefill == 0 {
            if decode > 0 {
                self.decode_step = Some(ema(self.decode_step, secs));
            }
            return;
        }
        let base = if decode > 0 {
            self.decode_step.unwrap_or(0.0)
        } else {
            0.0
        };
        let per_row = ((secs - base) / prefill as f64).max(1e-7);
        self.per_row = Some(ema(self.per_row, per_row));
    }

    /// Prefill rows a step that also decodes may hold, at most `max`.
    pub fn cap(&self, max: usize) -> usize {
        match (self.decode_step, self.per_row) {
            (Some(d), Some(p)) => {
                ((SHARE * d / p) as usize).clamp(MIN_PREFILL_ROWS, max.max(MIN_PREFILL_ROWS))
            }
            _ => FIRST_PREFILL_ROWS.min(max),
        }
        .min(max)
    }
}

fn ema(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + EMA * (new - o),
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(max_rows: usize, chunk: usize, cap: usize) -> StepLimits {
        StepLimits {
            max_rows,
            chunk,
            prefill_cap: cap,
        }
    }

    #[test]
    fn decodes_go_first_then_prefill_fills_the_cap() {
        let c = [
            Candidate {
                slot: 2,
                want: Want::Prefill {
                    next: 0,
                    total: 6000,
                },
            },
            Candidate {
                slot: 0,
                want: Want::Decode { draft: 0 },
            },
            Candidate {
                slot: 1,
                want: Want::Decode { draft: 0 },
            },
        ];
        let plan = plan_step(&c, &lim(512, 512, 40));
        assert_eq!(
            plan,
            vec![
                Planned { slot: 0, rows: 1 },
                Planned { slot: 1, rows: 1 },
                Planned { slot: 2, rows: 40 }
            ]
        );
    }

    #[test]
    fn alone_a_prefill_takes_whole_chunks_on_chunk_boundaries() {
        let c = [Candidate {
            slot: 0,
            want: Want::Prefill {
                next: 100,
                total: 1400,
            },
        }];
        assert_eq!(
            plan_step(&c, &lim(512, 512, 8)),
            vec![Planned { slot: 0, rows: 412 }]
        );
        let c = [Candidate {
            slot: 0,
            want: Want::Prefill {
                next: 1024,
                total: 1400,
            },
        }];
        assert_eq!(
            plan_step(&c, &lim(512, 512, 8)),
            vec![Planned { slot: 0, rows: 376 }]
        );
    }

    #[test]
    fn a_piece_never_crosses_a_chunk_boundary() {
        let c = [
            Candidate {
                slot: 0,
                want: Want::Decode { draft: 0 },
            },
            Candidate {
                slot: 1,
                want: Want::Prefill {
                    next: 500,
                    total: 3000,
                },
            },
            Candidate {
                slot: 3,
                want: Want::Prefill { next: 0, total: 20 },
            },
        ];
        // Slot 1 stops at 512; what is left of the cap goes to slot 3.
        let plan = plan_step(&c, &lim(512, 512, 40));
        assert_eq!(
            plan,
            vec![
                Planned { slot: 0, rows: 1 },
                Planned { slot: 1, rows: 12 },
                Planned { slot: 3, rows: 20 }
            ]
        );
    }

    #[test]
    fn the_batch_bounds_everything() {
        let c: Vec<Candidate> = (0..6)
            .map(|slot| Candidate {
                slot,
                want: Want::Decode { draft: 0 },
            })
            .collect();
        assert_eq!(plan_step(&c, &lim(4, 512, 8)).len(), 4);
        let c = [
            Candidate {
                slot: 0,
                want: Want::Decode { draft: 0 },
            },
            Candidate {
                slot: 1,
                want: Want::Prefill { next: 0, total: 9 },
            },
        ];
        assert_eq!(
            plan_step(&c, &lim(4, 512, 100))[1],
            Planned { slot: 1, rows: 3 }
        );
        let done = [Candidate {
            slot: 0,
            want: Want::Prefill { next: 9, total: 9 },
        }];
        assert!(plan_step(&done, &lim(4, 512, 100)).is_empty());
    }

    #[test]
    fn drafts_ride_with_their_decode_within_the_batch() {
        let c = [
            Candidate {
                slot: 0,
                want: Want::Decode { draft: 5 },
            },
            Candidate {
                slot: 1,
                want: Want::Decode { draft: 0 },
            },
            Candidate {
                slot: 2,
                want: Want::Decode { draft: 4 },
            },
            Candidate {
                slot: 3,
                want: Want::Prefill {
                    next: 0,
                    total: 100,
                },
            },
        ];
        let plan = plan_step(&c, &lim(10, 512, 40));
        // Three decode rows, then drafts in admission order until the batch
        // is full; nothing is left for the prefill.
        assert_eq!(
            plan,
            vec![
                Planned { slot: 0, rows: 6 },
                Planned { slot: 1, rows: 1 },
                Planned { slot: 2, rows: 3 }
            ]
        );
        let plan = plan_step(&c, &lim(512, 512, 40));
        assert_eq!(plan[0].rows + plan[1].rows + plan[2].rows, 12);
        assert_eq!(plan[3], Planned { slot: 3, rows: 40 });
    }

    #[test]
    fn the_youngest_is_preempted() {
        assert_eq!(preemption_victim(&[(0, 5), (3, 9), (1, 7)]), Some(3));
        assert_eq!(preemption_victim(&[]), None);
    }

    #[test]
    fn the_pacer_keeps_mixed_steps_near_a_decode_step() {
        let mut p = PrefillPacer::default();
        assert_eq!(p.cap(512), FIRST_PREFILL_ROWS);
        // Decode steps of 10 ms; each prefill row adds 0.5 ms.
        for _ in 0..50 {
            p.observe(2, 0, 0.010);
            p.observe(2, 40, 0.030);
        }
        let cap = p.cap(512);
        assert!((12..=16).contains(&cap), "{cap}");
        // Mixed steps with that cap take at most (1 + SHARE) decode steps.
        assert!(0.010 + cap as f64 * 0.0005 <= 0.010 * (1.0 + SHARE) + 1e-9);
        assert_eq!(p.cap(4), 4);
        // A fast prefill (a GPU) gets a large share, within the batch.
        let mut fast = PrefillPacer::default();
        fast.observe(1, 0, 0.010);
        fast.observe(0, 512, 0.0512);
        assert!((69..=70).contains(&fast.cap(512)), "{}", fast.cap(512));
    }
}
