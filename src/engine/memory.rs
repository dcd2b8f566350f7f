//! What the model's KV memory allows: cutting a sequence back, sharing a
//! prefix between sequences. Pure: the worker asks these questions before
//! it offers a prefix, truncates, forks or speculates.

/// How far a sequence's memory can be rewound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewind {
    /// Plain attention KV (and a full-size sliding-window cache): any
    /// prefix, cut anywhere, cells shared between sequences by `seq_cp`.
    Free,
    /// A sliding-window cache of normal size (`n_swa` per sequence plus a
    /// batch): a cell falls out of the window and is reused once the
    /// sequence has moved `n_swa` past it. A sequence can be cut back only
    /// while the window before the cut is still there, and a shared cell is
    /// never reused, so prefixes are not shared by `seq_cp`.
    Window { n_swa: u32 },
    /// Recurrent or hybrid state: only extended or cleared, but for its
    /// last `rollback` positions (llama.cpp's `n_rs_seq` snapshots: a
    /// speculative step's rejected drafts), once between two decodes.
    Fixed { rollback: usize },
}

impl Rewind {
    /// Whether only whole sequences and snapshots may be reused: restoring
    /// one and cutting it back is not possible (or not known to be).
    pub fn whole_snapshots_only(self) -> bool {
        !matches!(self, Rewind::Free)
    }

    /// Whether a running sequence's prefix can be shared into another
    /// sequence by reference (`seq_cp`).
    pub fn shares_cells(self) -> bool {
        matches!(self, Rewind::Free)
    }

    /// Whether prompts keep state checkpoints to restart from.
    pub fn needs_checkpoints(self) -> bool {
        !matches!(self, Rewind::Free)
    }

    /// The shortest length a sequence can be cut back to, given the lowest
    /// position its window cache still holds (`pos_min`, -1 when empty).
    /// The token at the cut attends to the `n_swa - 1` positions before
    /// it, so they must all still be there. llama.cpp reuses a sequence's
    /// cells that left the window oldest first, so `pos_min` tells (the
    /// rule llama-server applies). `None`:
    /// this memory cannot be cut back at all.
    pub fn cut_floor(self, pos_min: i32) -> Option<usize> {
        match self {
            Rewind::Free => Some(0),
            Rewind::Fixed { .. } => None,
            Rewind::Window { .. } if pos_min <= 0 => Some(0),
            Rewind::Window { n_swa } => Some(pos_min as usize + n_swa as usize),
        }
    }

    /// Whether a sequence of `len` positions whose window starts at
    /// `pos_min` can be cut back to `keep`.
    pub fn can_cut(self, len: usize, keep: usize, pos_min: i32) -> bool {
        if let Rewind::Fixed { rollback } = self {
            return keep >= len || len - keep <= rollback;
        }
        keep >= len || self.cut_floor(pos_min).is_some_and(|floor| keep >= floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_attention_cuts_anywhere_and_shares() {
        let m = Rewind::Free;
        assert!(m.can_cut(1000, 0, 0));
        assert!(m.shares_cells());
        assert!(!m.whole_snapshots_only());
        assert!(!m.needs_checkpoints());
    }

    #[test]
    fn recurrent_state_is_only_extended_or_cleared() {
        let m = Rewind::Fixed { rollback: 0 };
        assert!(!m.can_cut(1000, 999, 0));
        assert!(m.can_cut(1000, 1000, 0), "a cut at the end is no cut");
        assert!(!m.shares_cells());
        assert!(m.needs_checkpoints());
        assert!(m.cut_floor(0).is_none(), "no prefix of it is offered");
    }

    #[test]
    fn recurrent_rollback_drops_only_the_last_few_positions() {
        let m = Rewind::Fixed { rollback: 8 };
        assert!(m.can_cut(1000, 992, 0));
        assert!(!m.can_cut(1000, 991, 0));
        assert!(
            m.cut_floor(0).is_none(),
            "admission still reuses whole sequences only"
        );
        assert!(m.whole_snapshots_only());
    }

    #[test]
    fn a_window_cuts_back_only_while_its_cells_are_there() {
        let m = Rewind::Window { n_swa: 512 };
        // Shorter than the window: nothing has been dropped yet.
        assert!(m.can_cut(400, 10, 0));
        // Cells below 1500 were reused: the token at `keep` needs the
        // 511 positions before it, so keep >= 1500 + 512.
        assert!(!m.can_cut(2100, 2011, 1500));
        assert!(m.can_cut(2100, 2012, 1500));
        assert!(m.can_cut(2100, 2100, 1500));
        assert!(!m.shares_cells());
        assert!(m.whole_snapshots_only());
        assert!(m.needs_checkpoints());
    }
}
