//! Messages with an ETA (or countdown) in the future, held by the worker until due.
//!
//! A min-heap keyed by `(due, arrival)`: the earliest due time first, and among equal
//! due times the one pushed first. Due times are UNIX seconds (`f64`, as Python's
//! `datetime.timestamp()`); a NaN or infinite one is refused, so the order is total.
//! The items stay unacked while held (as in Celery), which is the caller's business:
//! this type only orders them.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::error::{Error, Result};

struct Entry<T> {
    due: f64,
    seq: u64,
    item: T,
}

impl<T> Entry<T> {
    /// Earliest due time first, then first pushed.
    fn earlier(&self, other: &Self) -> Ordering {
        self.due
            .total_cmp(&other.due)
            .then(self.seq.cmp(&other.seq))
    }
}

// `BinaryHeap` is a max-heap: the "greatest" entry is the earliest one.
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        other.earlier(self)
    }
}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<T> Eq for Entry<T> {}

/// Items keyed by a due time; [`pop_due`](Self::pop_due) hands back those whose time
/// came, earliest first (first pushed first among equal due times).
pub struct EtaSchedule<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
}

impl<T> Default for EtaSchedule<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> std::fmt::Debug for EtaSchedule<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtaSchedule")
            .field("len", &self.heap.len())
            .field("next_due", &self.next_due())
            .finish()
    }
}

impl<T> EtaSchedule<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hold `item` until `due` (UNIX seconds). `Error::Config` for a NaN or infinite
    /// `due` (nothing is held then).
    pub fn push(&mut self, due: f64, item: T) -> Result<()> {
        if !due.is_finite() {
            return Err(Error::Config(format!(
                "an ETA must be a finite UNIX time in seconds, not {due}"
            )));
        }
        // -0.0 and 0.0 are the same time: keep them in arrival order.
        let due = due + 0.0;
        let seq = self.seq;
        self.seq += 1;
        self.heap.push(Entry { due, seq, item });
        Ok(())
    }

    /// The earliest due time, or `None` when nothing is held.
    pub fn next_due(&self) -> Option<f64> {
        self.heap.peek().map(|entry| entry.due)
    }

    /// The items due at `now` or earlier, earliest first, at most `limit` of them
    /// (all with `None`). A NaN `now` finds nothing due.
    pub fn pop_due(&mut self, now: f64, limit: Option<usize>) -> Vec<T> {
        let limit = limit.unwrap_or(usize::MAX);
        let mut due = Vec::new();
        while due.len() < limit {
            match self.heap.peek() {
                Some(entry) if entry.due <= now => {}
                _ => break,
            }
            match self.heap.pop() {
                Some(entry) => due.push(entry.item),
                None => break,
            }
        }
        due
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Remove and return everything held, earliest first (warm shutdown).
    pub fn drain(&mut self) -> Vec<T> {
        let mut entries = std::mem::take(&mut self.heap).into_vec();
        entries.sort_unstable_by(Entry::earlier);
        entries.into_iter().map(|entry| entry.item).collect()
    }

    /// Remove and return the items `remove` says yes to, earliest first (revoke); the
    /// others stay in their order.
    pub fn remove_where(&mut self, mut remove: impl FnMut(&T) -> bool) -> Vec<T> {
        let (mut removed, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.heap)
            .into_vec()
            .into_iter()
            .partition(|entry| remove(&entry.item));
        self.heap = BinaryHeap::from(kept);
        removed.sort_unstable_by(Entry::earlier);
        removed.into_iter().map(|entry| entry.item).collect()
    }

    /// Everything held with its due time, earliest first (remote control's inspect).
    pub fn sorted(&self) -> Vec<(f64, &T)> {
        let mut entries: Vec<&Entry<T>> = self.heap.iter().collect();
        entries.sort_unstable_by(|a, b| a.earlier(b));
        entries
            .into_iter()
            .map(|entry| (entry.due, &entry.item))
            .collect()
    }

    /// Everything held, in no particular order (the garbage collector's visit).
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.heap.iter().map(|entry| &entry.item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn earliest_first_and_first_pushed_among_equal_times() {
        let mut eta = EtaSchedule::new();
        for (due, item) in [(5.0, "e"), (1.0, "a"), (3.0, "c1"), (3.0, "c2"), (2.0, "b")] {
            eta.push(due, item).unwrap();
        }
        eta.push(3.0, "c3").unwrap();
        assert_eq!(eta.len(), 6);
        assert_eq!(eta.next_due(), Some(1.0));
        assert_eq!(eta.pop_due(0.5, None), Vec::<&str>::new());
        assert_eq!(eta.pop_due(3.0, Some(3)), ["a", "b", "c1"]);
        assert_eq!(eta.next_due(), Some(3.0));
        assert_eq!(eta.pop_due(3.0, None), ["c2", "c3"]);
        assert_eq!(eta.pop_due(4.0, None), Vec::<&str>::new());
        assert_eq!(eta.pop_due(f64::INFINITY, Some(0)), Vec::<&str>::new());
        assert_eq!(eta.pop_due(f64::INFINITY, None), ["e"]);
        assert!(eta.is_empty());
        assert_eq!(eta.next_due(), None);
    }

    #[test]
    fn nan_and_infinite_times_are_refused_not_held() {
        let mut eta = EtaSchedule::new();
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -f64::NAN] {
            let err = eta.push(bad, 1).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
            assert!(err.to_string().contains("finite"), "{err}");
        }
        assert!(eta.is_empty());
        eta.push(1.0, 2).unwrap();
        assert_eq!(eta.pop_due(f64::NAN, None), Vec::<i32>::new());
        assert_eq!(eta.len(), 1);
    }

    #[test]
    fn negative_zero_is_zero() {
        let mut eta = EtaSchedule::new();
        eta.push(0.0, "first").unwrap();
        eta.push(-0.0, "second").unwrap();
        assert_eq!(eta.pop_due(0.0, None), ["first", "second"]);
    }

    #[test]
    fn drain_sorted_and_remove_where() {
        let mut eta = EtaSchedule::new();
        for (i, due) in [4.0, 2.0, 2.0, 9.0, 1.0].into_iter().enumerate() {
            eta.push(due, i).unwrap();
        }
        let sorted: Vec<_> = eta.sorted().into_iter().map(|(d, &i)| (d, i)).collect();
        assert_eq!(sorted, [(1.0, 4), (2.0, 1), (2.0, 2), (4.0, 0), (9.0, 3)]);
        assert_eq!(eta.iter().count(), 5);
        assert_eq!(eta.remove_where(|&i| i % 2 == 0), [4, 2, 0]);
        assert_eq!(eta.len(), 2);
        eta.push(2.0, 7).unwrap();
        assert_eq!(eta.drain(), [1, 7, 3]);
        assert!(eta.is_empty());
        assert_eq!(eta.drain(), Vec::<usize>::new());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8),
        PopDue(u8, Option<usize>),
        Drain,
        RemoveWhere(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct times, so equal due times are common.
        prop_oneof![
            6 => (0u8..16).prop_map(Op::Push),
            3 => (0u8..18, proptest::option::of(0usize..6)).prop_map(|(n, l)| Op::PopDue(n, l)),
            1 => Just(Op::Drain),
            1 => (2u8..5).prop_map(Op::RemoveWhere),
        ]
    }

    proptest! {
        /// Against a list kept in arrival order and searched naively.
        #[test]
        fn behaves_like_a_stable_sort_by_due_time(ops in proptest::collection::vec(op(), 0..200)) {
            let mut eta = EtaSchedule::new();
            let mut model: Vec<(f64, u32)> = Vec::new();
            let mut next = 0u32;
            for op in ops {
                match op {
                    Op::Push(t) => {
                        let due = f64::from(t) / 2.0;
                        eta.push(due, next).unwrap();
                        model.push((due, next));
                        next += 1;
                    }
                    Op::PopDue(n, limit) => {
                        let now = f64::from(n) / 2.0;
                        let mut ready: Vec<(f64, u32)> =
                            model.iter().copied().filter(|&(d, _)| d <= now).collect();
                        ready.sort_by(|a, b| a.0.total_cmp(&b.0)); // stable: arrival order
                        ready.truncate(limit.unwrap_or(usize::MAX));
                        model.retain(|entry| !ready.contains(entry));
                        let expected: Vec<u32> = ready.into_iter().map(|(_, i)| i).collect();
                        prop_assert_eq!(eta.pop_due(now, limit), expected);
                    }
                    Op::Drain => {
                        model.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let expected: Vec<u32> = model.drain(..).map(|(_, i)| i).collect();
                        prop_assert_eq!(eta.drain(), expected);
                    }
                    Op::RemoveWhere(k) => {
                        let k = u32::from(k);
                        let mut gone: Vec<(f64, u32)> =
                            model.iter().copied().filter(|&(_, i)| i % k == 0).collect();
                        gone.sort_by(|a, b| a.0.total_cmp(&b.0));
                        model.retain(|&(_, i)| i % k != 0);
                        let expected: Vec<u32> = gone.into_iter().map(|(_, i)| i).collect();
                        prop_assert_eq!(eta.remove_where(|&i| i % k == 0), expected);
                    }
                }
                prop_assert_eq!(eta.len(), model.len());
                let min = model.iter().map(|&(d, _)| d).min_by(f64::total_cmp);
                prop_assert_eq!(eta.next_due(), min);
                let mut sorted = model.clone();
                sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
                let held: Vec<(f64, u32)> = eta.sorted().into_iter().map(|(d, &i)| (d, i)).collect();
                prop_assert_eq!(held, sorted);
            }
        }
    }
}
