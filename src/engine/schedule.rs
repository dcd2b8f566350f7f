//! The scheduling policy: which rows go into the next step. Pure functions
//! over what each sequence wants, so they are tested without llama.cpp;
//! only the step loop (`worker`) touches the context.
//!
//! A step holds one token for every decoding sequence first, then the
//! drafted tokens those sequences want verified (speculative decoding),
//! then prefill rows of the sequences still reading their prompts, up to
//! the batch. While anything is decoding, prefill is time-sliced by
//! [`PrefillCredit`], so decoding keeps about `1 / (1 + SHARE)` of the
//! time; with nothing decoding, a prefill takes whole
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
    /// Prefill rows allowed in a step that also decodes (0: none this
    /// step).
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
        room = room.min(lim.prefill_cap);
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

/// Where `marker` starts in `tokens` after position `from` and before the
/// last token: besides chunk ends, where prefill pieces of memory kept by
/// checkpoints end. They depend on the prompt alone, so a prompt restarted
/// from a checkpoint taken at one of them is computed in the same pieces
/// as the same prompt from cold.
pub fn turn_marks<T: PartialEq>(tokens: &[T], marker: &[T], from: usize) -> Vec<usize> {
    if marker.is_empty() || tokens.len() < marker.len() {
        return Vec::new();
    }
    tokens
        .windows(marker.len())
        .enumerate()
        .skip(from + 1)
        .filter(|(p, w)| *p + 1 < tokens.len() && *w == marker)
        .map(|(p, _)| p)
        .collect()
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
const SHARE: f64 = 0.5;
/// Weight of the newest step in the cost model's moving sums (a window of
/// about 50 steps).
const DECAY: f64 = 0.02;

/// What a step costs: `base + per_row * rows` seconds, fitted online (a
/// least-squares line over recent steps) from the steps the engine runs.
/// It sizes the prefill share of steps that also decode, and how many
/// drafted tokens are worth their rows.
#[derive(Debug, Clone, Default)]
pub struct StepCost {
    /// Decayed sums over recent steps: weight, rows, secs, rows², rows·secs.
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    /// The last fit that had steps of different sizes to go on.
    fit: Option<(f64, f64)>,
}

impl StepCost {
    /// A step of `rows` rows took `secs`.
    pub fn observe(&mut self, rows: usize, secs: f64) {
        let (x, y) = (rows as f64, secs);
        let keep = 1.0 - DECAY;
        self.w = self.w * keep + 1.0;
        self.x = self.x * keep + x;
        self.y = self.y * keep + y;
        self.xx = self.xx * keep + x * x;
        self.xy = self.xy * keep + x * y;
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        if var > 0.25 {
            let per_row = ((self.xy / self.w - mx * my) / var).max(1e-7);
            let base = (my - per_row * mx).max(0.0);
            self.fit = Some((base, per_row));
        }
    }

    /// (base, per row) seconds, once steps of different sizes were seen.
    pub fn fit(&self) -> Option<(f64, f64)> {
        self.fit
    }
}

/// Time-sliced prefill beside decoding. Decode-only steps earn prefill
/// time (`SHARE` of their own); a step may carry prefill rows (a whole
/// chunk piece, the efficient size) only while the credit is not negative,
/// and what its prefill rows added to it is then charged. Decoding streams
/// so keep about `1 / (1 + SHARE)` of their speed, whatever a prompt row
/// costs (deep in a long prompt a single row can cost more than a whole
/// decode step), and the prompt gets the rest in chunks.
#[derive(Debug, Clone, Default)]
pub struct PrefillCredit {
    /// Seconds of prefill the decoding streams can spare now.
    credit: f64,
    /// Seconds of a decode-only step (moving average).
    decode_step: Option<f64>,
}

/// Credit saved up beyond this is not kept: a prefill gets its share
/// as it goes, not in one long burst after a quiet spell.
const MAX_CREDIT: f64 = 0.25;

impl PrefillCredit {
    /// Whether the next step that decodes may also prefill.
    pub fn allows_prefill(&self) -> bool {
        self.credit >= 0.0
    }

    /// A step with `decode_rows` and `prefill_rows` rows took `secs`.
    pub fn observe(&mut self, decode_rows: usize, prefill_rows: usize, secs: f64) {
        match (decode_rows, prefill_rows) {
            (0, _) => self.credit = 0.0,
            (_, 0) => {
                self.decode_step = Some(match self.decode_step {
                    Some(d) => d + 0.2 * (secs - d),
                    None => secs,
                });
                self.credit = (self.credit + SHARE * secs).min(MAX_CREDIT);
            }
            _ => self.credit -= (secs - self.decode_step.unwrap_or(0.0)).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_marks_fall_where_the_marker_starts_after_the_reused_part() {
        // 7 8 opens an assistant turn.
        let t = [1, 7, 8, 2, 3, 7, 8, 4, 7, 8];
        assert_eq!(turn_marks(&t, &[7, 8], 0), vec![1, 5, 8]);
        assert_eq!(
            turn_marks(&t, &[7, 8], 1),
            vec![5, 8],
            "not at the restart point itself"
        );
        assert_eq!(turn_marks(&t, &[7, 8], 5), vec![8]);
        assert!(turn_marks(&t, &[], 0).is_empty());
        assert!(turn_marks(&t, &[9], 0).is_empty());
        // Never the last token: a piece ending there is the prompt's end.
        assert_eq!(turn_marks(&[1, 2, 7], &[7], 0), Vec::<usize>::new());
    }

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
    fn the_cost_model_fits_a_line() {
        let mut c = StepCost::default();
        assert_eq!(c.fit(), None);
        // Steps cost 7 ms plus 4 ms a row (a CPU: rows are dear).
        for _ in 0..30 {
            for rows in [1, 1, 9, 512] {
                c.observe(rows, 0.007 + 0.004 * rows as f64);
            }
        }
        let (base, per_row) = c.fit().unwrap();
        assert!(
            (base - 0.007).abs() < 1e-4 && (per_row - 0.004).abs() < 1e-5,
            "{base} {per_row}"
        );
        // The fit follows a machine that gets busy.
        for _ in 0..100 {
            for rows in [1, 4, 512] {
                c.observe(rows, 0.020 + 0.002 * rows as f64);
            }
        }
        let (base, per_row) = c.fit().unwrap();
        assert!(
            (base - 0.020).abs() < 2e-3 && (per_row - 0.002).abs() < 1e-4,
            "{base} {per_row}"
        );
        // Steps all of one size tell nothing.
        let mut one = StepCost::default();
        for _ in 0..50 {
            one.observe(1, 0.01);
        }
        assert_eq!(one.fit(), None);
    }

    #[test]
    fn prefill_beside_decoding_takes_its_share_of_time() {
        let mut p = PrefillCredit::default();
        assert!(p.allows_prefill());
        // Decode steps of 10 ms; a prefill chunk adds 500 ms.
        let (mut decode_time, mut prefill_time) = (0.0, 0.0);
        for _ in 0..10_000 {
            if p.allows_prefill() {
                p.observe(1, 512, 0.510);
                prefill_time += 0.5;
                decode_time += 0.010;
            } else {
                p.observe(1, 0, 0.010);
                decode_time += 0.010;
            }
        }
        // Decoding keeps about 1 / (1 + SHARE) of the time.
        let share = decode_time / (decode_time + prefill_time);
        assert!((share - 1.0 / (1.0 + SHARE)).abs() < 0.02, "{share}");
        // With nothing decoding, a prefill owes nothing.
        p.observe(0, 512, 0.5);
        assert!(p.allows_prefill());
    }
}
