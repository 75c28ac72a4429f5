//! Fuzz the edge of the packet path: arbitrary bytes are split into packets, parsed, and every
//! packet that parses is tracked by one small table, with time moving on; the table's
//! invariants must hold after each packet.
#![no_main]

use fwnode::conntrack::{Config, Conntrack};
use fwnode::packet::Packet;
use fwnode::time::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ct = Conntrack::new(&Config {
        shards: 2,
        max_entries: 16,
        event_queue: 8,
        ..Config::default()
    });
    let mut now = 0u64;
    // Input format: [len: u8][time step: u8][packet bytes; len] ...
    let mut rest = data;
    while let [len, step, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (pkt, next) = tail.split_at(n);
        rest = next;
        now += u64::from(*step) * 100;
        if let Ok(p) = Packet::parse(pkt) {
            let _ = ct.track(Timestamp::from_millis(now), &p);
        }
        for i in 0..ct.shard_count() {
            if let Err(e) = ct.lock(i).check_invariants() {
                panic!("invariant broken: {e}");
            }
        }
    }
});
