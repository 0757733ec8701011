//! Which AMQP delivery tags a consumer's channel may settle with one `multiple=true` ack.
//!
//! `basic.ack(tag, multiple=true)` settles every unacked delivery on the channel up to
//! `tag`, whether or not the consumer has handed it over yet. The broker numbers the
//! deliveries of a channel 1, 2, 3...; they reach the consumer in that order per lapin
//! consumer, but not across consumers: each queue consumed has its own buffer, and a
//! cancelled consumer's buffer may still be read after a newer one's. So a run of acks
//! is merged only over tag numbers that were all handed over and are all settled;
//! anything else is acked one by one.

use std::collections::{BTreeMap, BTreeSet};

/// The delivery tags of one channel: handed over, settled, and the gaps between.
#[derive(Debug, Default)]
pub struct TagLedger {
    /// Every tag from 1 up to this one was handed over and is settled (acked or
    /// rejected): a `multiple=true` ack may reach over them.
    settled_through: u64,
    /// Handed over, not yet acked or rejected.
    outstanding: BTreeSet<u64>,
    /// Settled tags above `settled_through`, as inclusive ranges `start -> end`. The
    /// tag just below the first range is outstanding or not handed over yet.
    settled: BTreeMap<u64, u64>,
}

/// Acks to write: one `multiple=true` ack up to a tag, then single acks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckPlan {
    pub multiple_up_to: Option<u64>,
    pub singles: Vec<u64>,
}

impl TagLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new channel: its tags start again at 1.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// `tag` was handed over to the worker.
    pub fn handed_over(&mut self, tag: u64) {
        if tag > self.settled_through {
            self.outstanding.insert(tag);
        }
    }

    /// Handed over and neither acked nor rejected.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// `tag` is rejected (requeued or dropped) on its own: true when it was outstanding,
    /// i.e. the reject is to be written.
    pub fn reject(&mut self, tag: u64) -> bool {
        if !self.outstanding.remove(&tag) {
            return false;
        }
        self.settle(tag);
        self.advance();
        true
    }

    /// Settle the outstanding tags among `acked` (others are ignored: acked already, or
    /// never handed over). The ones the settled prefix of tag numbers now reaches
    /// become one `multiple=true` ack; the rest single acks.
    pub fn plan_acks(&mut self, acked: &BTreeSet<u64>) -> AckPlan {
        let mut taken = Vec::with_capacity(acked.len());
        for &tag in acked {
            if self.outstanding.remove(&tag) {
                self.settle(tag);
                taken.push(tag);
            }
        }
        self.advance();
        let reach = self.settled_through;
        // `taken` is ascending: the prefix within reach is covered by its last tag.
        let within = taken.partition_point(|&tag| tag <= reach);
        AckPlan {
            multiple_up_to: within.checked_sub(1).map(|last| taken[last]),
            singles: taken.split_off(within),
        }
    }

    /// Record `tag` as settled, merging it with the ranges beside it.
    fn settle(&mut self, tag: u64) {
        let mut start = tag;
        let mut end = tag;
        if let Some((&below_start, &below_end)) = self.settled.range(..tag).next_back() {
            if below_end.checked_add(1) == Some(tag) {
                start = below_start;
                self.settled.remove(&below_start);
            }
        }
        if let Some(above_end) = tag
            .checked_add(1)
            .and_then(|next| self.settled.remove(&next))
        {
            end = above_end;
        }
        self.settled.insert(start, end);
    }

    /// Move `settled_through` over a settled range that starts right above it.
    fn advance(&mut self) {
        let next = self.settled_through.saturating_add(1);
        if let Some(end) = self.settled.remove(&next) {
            self.settled_through = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(handed_over: impl IntoIterator<Item = u64>) -> TagLedger {
        let mut ledger = TagLedger::new();
        for tag in handed_over {
            ledger.handed_over(tag);
        }
        ledger
    }

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    fn plan(multiple_up_to: Option<u64>, singles: &[u64]) -> AckPlan {
        AckPlan {
            multiple_up_to,
            singles: singles.to_vec(),
        }
    }

    #[test]
    fn contiguous_acks_from_the_first_tag_become_one_multiple_ack() {
        let mut tags = ledger(1..=10);
        assert_eq!(
            tags.plan_acks(&set(&[1, 2, 3, 5, 9])),
            plan(Some(3), &[5, 9])
        );
        assert_eq!(tags.plan_acks(&set(&[6, 7])), plan(None, &[6, 7]));
        // 4 fills the gap: one ack up to 10 covers 8 and 10; 5..7 and 9 are settled.
        assert_eq!(tags.plan_acks(&set(&[4, 8, 10, 99])), plan(Some(10), &[]));
        assert_eq!(tags.outstanding(), 0);
        assert_eq!(tags.settled_through, 10);
        assert!(tags.settled.is_empty());
    }

    #[test]
    fn a_multiple_ack_never_reaches_over_a_tag_not_handed_over() {
        // Tag 3 was delivered on the channel but is still inside lapin (another
        // queue's consumer, or behind a cancel): acking 1, 2 and 4 must not ack it.
        let mut tags = ledger([1, 2, 4]);
        assert_eq!(tags.plan_acks(&set(&[1, 2, 4])), plan(Some(2), &[4]));
        // Once 3 is handed over and acked, the run reaches 4 (settled already).
        tags.handed_over(3);
        tags.handed_over(5);
        assert_eq!(tags.plan_acks(&set(&[3, 5])), plan(Some(5), &[]));
    }

    #[test]
    fn a_multiple_ack_reaches_over_rejected_tags_but_not_outstanding_ones() {
        let mut tags = ledger(1..=6);
        assert!(tags.reject(2));
        assert!(!tags.reject(2), "rejected once only");
        assert!(!tags.reject(40), "never handed over");
        // 2 was requeued on its own: the broker no longer counts it, 1..3 is one run.
        assert_eq!(tags.plan_acks(&set(&[1, 3, 5])), plan(Some(3), &[5]));
        // 4 is still being worked on: 6 alone.
        assert_eq!(tags.plan_acks(&set(&[6])), plan(None, &[6]));
        assert_eq!(tags.plan_acks(&set(&[4])), plan(Some(4), &[]));
        assert_eq!(tags.settled_through, 6);
    }

    #[test]
    fn a_gap_that_never_fills_costs_batching_not_memory() {
        // Tag 1 never handed over (in flight): every ack after it is a single, and the
        // settled tags above it stay one range.
        let mut tags = ledger(2..=10_001);
        for tag in 2..=10_001 {
            assert_eq!(tags.plan_acks(&set(&[tag])), plan(None, &[tag]));
        }
        assert_eq!(tags.settled.len(), 1);
        tags.handed_over(1);
        assert_eq!(tags.plan_acks(&set(&[1])), plan(Some(1), &[]));
        assert_eq!(tags.settled_through, 10_001);
    }

    #[test]
    fn clearing_starts_a_new_channel() {
        let mut tags = ledger(1..=3);
        assert_eq!(tags.plan_acks(&set(&[1, 2, 3])), plan(Some(3), &[]));
        tags.clear();
        tags.handed_over(1);
        assert_eq!(tags.outstanding(), 1);
        assert_eq!(tags.plan_acks(&set(&[1])), plan(Some(1), &[]));
    }
}
