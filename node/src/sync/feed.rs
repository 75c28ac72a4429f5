//! Where tracker events leave the packet path for replication, without the datapath ever
//! waiting on the network.
//!
//! Owns the per-worker `Feed`: under the shard lock a worker moves the shard's pending events
//! into its own buffer (`drain`), and once per batch hands the buffer to the replication thread
//! over a bounded channel (`flush`, never blocking). When that channel is full the events are
//! dropped, counted, and a resync is flagged (`Lost`), which makes every peer's session do a
//! bulk transfer. Must not touch the protocol or the network.

use std::cell::RefCell;
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

/// A batch of events from one worker.
pub type EventBatch = Vec<Event>;

/// The datapath's end of the event channel; one per worker thread.
#[derive(Debug)]
pub struct Feed {
    buf: RefCell<EventBatch>,
    tx: mpsc::Sender<EventBatch>,
    lost: Arc<Lost>,
}

/// The channel between the workers and the replication thread: `capacity` batches.
pub fn channel(capacity: usize) -> (FeedMaker, mpsc::Receiver<EventBatch>, Arc<Lost>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let lost = Arc::new(Lost::default());
    (
        FeedMaker {
            tx,
            lost: lost.clone(),
        },
        rx,
        lost,
    )
}

/// Makes one `Feed` per worker.
#[derive(Clone, Debug)]
pub struct FeedMaker {
    tx: mpsc::Sender<EventBatch>,
    lost: Arc<Lost>,
}

impl FeedMaker {
    pub fn feed(&self) -> Feed {
        Feed {
            buf: RefCell::new(Vec::new()),
            tx: self.tx.clone(),
            lost: self.lost.clone(),
        }
    }
}

impl Feed {
    /// Move the shard's pending events into this worker's buffer (the caller holds the lock).
    #[inline]
    pub fn drain(&self, shard: &mut Shard) {
        let mut buf = self.buf.borrow_mut();
        while let Some(ev) = shard.poll_event() {
            buf.push(ev);
        }
    }

    /// Hand the buffered events to the replication thread; never waits. Returns how many were
    /// handed over.
    pub fn flush(&self) -> usize {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return 0;
        }
        let n = buf.len();
        match self.tx.try_send(std::mem::take(&mut *buf)) {
            Ok(()) => n,
            Err(e) => {
                // Full (the replication thread is behind) or closed (it stopped): the peer's
                // copy is now incomplete, so it needs a bulk transfer.
                let dropped = match e {
                    mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => {
                        b.len()
                    }
                };
                self.lost.events.fetch_add(dropped as u64, Relaxed);
                self.lost.flagged.store(true, Relaxed);
                0
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
        let (maker, mut rx, lost) = channel(1);
        let feed = maker.feed();
        for port in [1000, 1001] {
            let bytes = syn(port);
            let p = Packet::parse(&bytes).unwrap();
            let mut sh = ct.lock_for(&p);
            sh.track(Timestamp::from_secs(1), &p);
            feed.drain(&mut sh);
        }
        assert_eq!(feed.flush(), 2);
        assert_eq!(rx.try_recv().unwrap().len(), 2);
        assert_eq!(feed.flush(), 0, "nothing buffered");

        // The channel holds one batch: the second is dropped, counted and flagged.
        for port in [2000, 2001] {
            let bytes = syn(port);
            let p = Packet::parse(&bytes).unwrap();
            let mut sh = ct.lock_for(&p);
            sh.track(Timestamp::from_secs(1), &p);
            feed.drain(&mut sh);
            feed.flush();
        }
        assert_eq!(lost.events.load(Relaxed), 1);
        assert!(lost.flagged.load(Relaxed));
        assert_eq!(rx.try_recv().unwrap().len(), 1);
    }
}
