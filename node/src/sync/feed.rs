//! Where tracker events leave the packet path for replication, without the datapath ever
//! waiting on the network.
//!
//! Owns the per-worker `Feed`: under the shard lock a worker moves the shard's pending events
//! into its own buffer (`drain`), and once per batch hands the buffer to the replication thread
//! over a bounded channel (`flush`, never blocking). When that channel is full the events are
//! dropped, counted, and a resync is flagged (`Lost`), which makes every peer's session do a
//! bulk transfer. Batches are numbered per worker, so that `defer` can tell when the peers have
//! a given batch. The replication thread hands emptied batch buffers back (`Spares`), so in
//! the steady state a batch allocates nothing. Must not touch the protocol or the network.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::conntrack::{Event, Shard};

/// Events lost between the datapath and the outbox, shared by all feeds.
#[derive(Debug, Default)]
pub struct Lost {
    /// Set when events were dropped; the replication thread takes it and starts bulks.
    pub flagged: AtomicBool,
    /// Events dropped because the channel was full.
    pub events: AtomicU64,
}

/// Emptied batch buffers, returned by the replication thread for the workers to fill again
/// (one lock per batch, never per packet).
#[derive(Debug, Default)]
pub struct Spares(parking_lot::Mutex<Vec<Vec<Event>>>);

impl Spares {
    /// Buffers kept; more are freed.
    const MAX: usize = 64;

    fn take(&self) -> Vec<Event> {
        self.0.lock().pop().unwrap_or_default()
    }

    /// Give back a buffer whose events have been taken.
    pub fn give(&self, mut v: Vec<Event>) {
        v.clear();
        let mut s = self.0.lock();
        if s.len() < Self::MAX {
            s.push(v);
        }
    }
}

/// A batch of events from one worker.
#[derive(Debug)]
pub struct EventBatch {
    /// The worker's index (`FeedMaker::feed`).
    pub worker: usize,
    /// Numbered from 1 per worker, in the order the worker flushed them.
    pub number: u64,
    pub events: Vec<Event>,
}

/// The datapath's end of the event channel; one per worker thread.
#[derive(Debug)]
pub struct Feed {
    buf: RefCell<Vec<Event>>,
    worker: usize,
    /// The number the next flushed batch gets.
    next: Cell<u64>,
    tx: mpsc::Sender<EventBatch>,
    lost: Arc<Lost>,
    spares: Arc<Spares>,
}

/// What `Feed::flush` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Nothing was buffered.
    Empty,
    /// Batch `number` with `events` events went to the replication thread.
    Sent { number: u64, events: usize },
    /// Batch `number` was dropped (channel full or closed), counted and flagged for a resync.
    Lost { number: u64 },
}

/// The replication thread's end of the channel.
#[derive(Debug)]
pub struct Events {
    pub rx: mpsc::Receiver<EventBatch>,
    pub lost: Arc<Lost>,
    /// How many workers feed it (their indexes are `0..workers`).
    pub workers: usize,
    /// Where emptied batch buffers go back to.
    pub spares: Arc<Spares>,
}

/// The channel between `workers` workers and the replication thread: `capacity` batches.
pub fn channel(capacity: usize, workers: usize) -> (FeedMaker, Events) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let lost = Arc::new(Lost::default());
    let spares = Arc::new(Spares::default());
    (
        FeedMaker {
            tx,
            lost: lost.clone(),
            spares: spares.clone(),
        },
        Events {
            rx,
            lost,
            workers,
            spares,
        },
    )
}

/// Makes one `Feed` per worker.
#[derive(Clone, Debug)]
pub struct FeedMaker {
    tx: mpsc::Sender<EventBatch>,
    lost: Arc<Lost>,
    spares: Arc<Spares>,
}

impl FeedMaker {
    /// The feed of worker `worker`.
    pub fn feed(&self, worker: usize) -> Feed {
        Feed {
            buf: RefCell::new(Vec::new()),
            worker,
            next: Cell::new(1),
            tx: self.tx.clone(),
            lost: self.lost.clone(),
            spares: self.spares.clone(),
        }
    }
}

impl Feed {
    /// Move the shard's pending events into this worker's buffer (the caller holds the lock).
    /// Events the shard itself dropped (its queue overflowed, e.g. an expiry sweep ending
    /// more connections than it holds) flag a resync like a lost batch.
    #[inline]
    pub fn drain(&self, shard: &mut Shard) {
        let mut buf = self.buf.borrow_mut();
        while let Some(ev) = shard.poll_event() {
            buf.push(ev);
        }
        if shard.take_resync_needed() {
            self.lost.flagged.store(true, Relaxed);
        }
    }

    /// The number the batch now being filled will have.
    #[inline]
    pub fn batch_number(&self) -> u64 {
        self.next.get()
    }

    /// Hand the buffered events to the replication thread; never waits.
    pub fn flush(&self) -> Flushed {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return Flushed::Empty;
        }
        let number = self.next.get();
        self.next.set(number + 1);
        let events = std::mem::replace(&mut *buf, self.spares.take());
        let n = events.len();
        let batch = EventBatch {
            worker: self.worker,
            number,
            events,
        };
        match self.tx.try_send(batch) {
            Ok(()) => Flushed::Sent { number, events: n },
            Err(e) => {
                // Full (the replication thread is behind) or closed (it stopped): the peer's
                // copy is now incomplete, so it needs a bulk transfer.
                let (mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b)) = e;
                self.spares.give(b.events);
                self.lost.events.fetch_add(n as u64, Relaxed);
                self.lost.flagged.store(true, Relaxed);
                Flushed::Lost { number }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::{Config, Conntrack};
    use crate::packet::build::{self, TcpSpec};
    use crate::packet::{Packet, TcpFlags};
    use crate::time::Timestamp;

    fn syn(sport: u16) -> Vec<u8> {
        build::tcp(
            "198.51.100.10".parse().unwrap(),
            "203.0.113.10".parse().unwrap(),
            &TcpSpec::new(sport, 80, TcpFlags::SYN),
        )
    }

    #[test]
    fn events_reach_the_channel_per_batch_and_overflow_flags_a_resync() {
        let ct = Conntrack::new(&Config {
            shards: 1,
            ..Config::default()
        });
        let (
            maker,
            Events {
                mut rx,
                lost,
                spares,
                ..
            },
        ) = channel(1, 1);
        let feed = maker.feed(0);
        for port in [1000, 1001] {
            let bytes = syn(port);
            let p = Packet::parse(&bytes).unwrap();
            let mut sh = ct.lock_for(&p);
            sh.track(Timestamp::from_secs(1), &p);
            feed.drain(&mut sh);
        }
        assert_eq!(feed.batch_number(), 1);
        assert_eq!(
            feed.flush(),
            Flushed::Sent {
                number: 1,
                events: 2
            }
        );
        let first = rx.try_recv().unwrap();
        assert_eq!(first.events.len(), 2);
        assert_eq!(feed.flush(), Flushed::Empty, "nothing buffered");
        // The replication thread gives the emptied buffer back; the next batch reuses it.
        let reused = first.events.as_ptr();
        spares.give(first.events);
        assert!(
            feed.buf.borrow().capacity() == 0,
            "the worker filled a fresh buffer before"
        );
        assert_eq!(feed.batch_number(), 2);

        // The channel holds one batch: the second is dropped, counted and flagged.
        let mut flushed = vec![];
        for port in [2000, 2001] {
            let bytes = syn(port);
            let p = Packet::parse(&bytes).unwrap();
            let mut sh = ct.lock_for(&p);
            sh.track(Timestamp::from_secs(1), &p);
            feed.drain(&mut sh);
            flushed.push(feed.flush());
        }
        assert_eq!(
            flushed,
            [
                Flushed::Sent {
                    number: 2,
                    events: 1
                },
                Flushed::Lost { number: 3 }
            ]
        );
        assert_eq!(lost.events.load(Relaxed), 1);
        assert!(lost.flagged.load(Relaxed));
        assert_eq!(rx.try_recv().unwrap().events.len(), 1);
        // Batch 3 was filled in batch 1's returned buffer, and its loss gave that buffer back.
        let pool = spares.0.lock();
        assert_eq!(pool.len(), 1);
        assert_eq!(
            pool[0].as_ptr(),
            reused,
            "batch 1's buffer went round again"
        );
    }

    #[test]
    fn events_the_shard_dropped_flag_a_resync() {
        let ct = Conntrack::new(&Config {
            shards: 1,
            event_queue: 2,
            ..Config::default()
        });
        let (maker, Events { lost, .. }) = channel(8, 1);
        let feed = maker.feed(0);
        let mut sh = ct.lock(0);
        for port in 3000..3002 {
            let bytes = syn(port);
            sh.track(Timestamp::from_secs(1), &Packet::parse(&bytes).unwrap());
        }
        feed.drain(&mut sh);
        assert!(
            !lost.flagged.load(Relaxed),
            "two events fit the shard's queue"
        );
        // Three connections before a drain: the shard keeps two events and drops one.
        for port in 3002..3005 {
            let bytes = syn(port);
            sh.track(Timestamp::from_secs(1), &Packet::parse(&bytes).unwrap());
        }
        feed.drain(&mut sh);
        assert!(
            lost.flagged.load(Relaxed),
            "the peer missed an event: it needs a bulk"
        );
    }
}
