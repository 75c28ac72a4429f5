//! Packet logging to an NFLOG group: `log = true` on a rule, `default_log = true` for the
//! default action (issue 23 item 4), read with the usual tools (`tcpdump -i nflog:N`, ulogd2,
//! Suricata).
//!
//! Owns the mark layout that carries "log this packet as logged rule k" from a worker's verdict
//! to the kernel ([`LogMarks`]), each worker's rate limit per logged rule ([`Logging`]), the
//! NFLOG prefix that names a rule ([`prefix`]), the kernel's NFLOG rules of a policy
//! ([`LogRules`], rendered and run by `rules`) and keeping them in step with the enforced policy
//! ([`Installer`], driven by the binary's main loop).
//!
//! How a packet is logged. The worker decides it as always. When the rule (or the default) that
//! decided is logged and that rule's bucket in this worker has a token, the verdict becomes
//! NF_REPEAT with our mark bits: the rule's *slot* (1, 2, ...: the policy's logged rules in
//! order, then the default) and, when the policy accepted it, the *accept bit* (a reject keeps
//! the reject bit). The kernel re-runs our chain, which (before any queue rule, so a repeated
//! packet is never queued again) sends a packet with a slot to `NAME-log` (one NFLOG rule per
//! slot, with the rule's prefix), then REJECTs it (reject bit), or clears our bits and ACCEPTs
//! it (accept bit; `NAME-acc`), or DROPs it. What happens to the packet is carried by the mark
//! itself, never looked up by slot: while a new policy's NFLOG rules are being installed a packet
//! may be logged under the previous prefix of its slot, but its fate is the one its worker
//! decided. Over the rate the packet is decided and sent exactly as without `log` (counted as
//! suppressed). A packet that does not parse is dropped unlogged (no rule decided it).
//!
//! Nothing here runs for a policy without logged rules: the worker's only cost is one branch
//! on `CompiledPolicy::logs`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::nfqueue::Verdict;
use super::rules::{self, RulesError};
use super::worker::WorkerStats;
use crate::policy::{ActivePolicy, LogEntry};
use crate::rate::Bucket;

/// Default `datapath.log_mark`: bits 23-30. The lowest (0x800000) is the accept bit; the seven
/// above it number up to 127 logged rules (counting the default).
pub const LOG_MARK: u32 = 0x7f80_0000;

/// Default `datapath.log_group`: the NFLOG group (`tcpdump -i nflog:1`).
pub const LOG_GROUP: u16 = 1;

/// Default `datapath.log_rate` and `datapath.log_burst`: packets per second each logged rule
/// may log, and how many at once after a quiet spell (split over the workers).
pub const LOG_RATE: u32 = 10;
pub const LOG_BURST: u32 = 20;

/// Longest NFLOG prefix the kernel keeps (64 bytes with its NUL).
pub const MAX_PREFIX: usize = 63;

/// How long a failed NFLOG rule install waits before it is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The mark bits of logging: a contiguous mask whose lowest bit is the accept bit and whose
/// other bits hold the slot of the logged rule (0: not logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogMarks {
    mask: u32,
}

impl Default for LogMarks {
    fn default() -> Self {
        LogMarks { mask: LOG_MARK }
    }
}

impl LogMarks {
    /// Check `datapath.log_mark`: contiguous, 2 to 17 bits (a slot is a u16), clear of
    /// `reject_mark`.
    pub fn new(mask: u32, reject_mark: u32) -> Result<LogMarks, String> {
        let bits = mask.count_ones();
        let shifted = mask.checked_shr(mask.trailing_zeros()).unwrap_or(0);
        let contiguous = mask != 0 && shifted & shifted.wrapping_add(1) == 0;
        if !contiguous || !(2..=17).contains(&bits) {
            return Err(format!(
                "datapath.log_mark {mask:#x} must be 2 to 17 contiguous bits (e.g. {LOG_MARK:#x}): \
                 the lowest is the accept bit, the others number the logged rules"
            ));
        }
        if mask & reject_mark != 0 {
            return Err(format!(
                "datapath.log_mark {mask:#x} overlaps datapath.reject_mark {reject_mark:#x}"
            ));
        }
        Ok(LogMarks { mask })
    }

    /// The whole mask.
    pub fn mask(self) -> u32 {
        self.mask
    }

    /// The accept bit (the mask's lowest).
    pub fn accept_bit(self) -> u32 {
        self.mask & self.mask.wrapping_neg()
    }

    /// The bits that hold the slot.
    pub fn slot_mask(self) -> u32 {
        self.mask & !self.accept_bit()
    }

    /// How many logged rules (counting the default) the slot bits number.
    pub fn max_slots(self) -> usize {
        (1usize << self.slot_mask().count_ones()) - 1
    }

    /// The mark bits of `slot` (no accept bit).
    pub fn slot_mark(self, slot: u16) -> u32 {
        (u32::from(slot) << self.slot_mask().trailing_zeros()) & self.slot_mask()
    }

    /// `verdict` as sent for a packet logged in `slot`: repeated through our chain with the
    /// slot, and the accept bit when it was accepted.
    pub fn logged(self, verdict: Verdict, slot: u16) -> Verdict {
        let s = self.slot_mark(slot);
        match verdict {
            Verdict::Accept => Verdict::Repeat {
                mark: s | self.accept_bit(),
            },
            Verdict::Drop => Verdict::Repeat { mark: s },
            Verdict::Repeat { mark } => Verdict::Repeat { mark: mark | s },
        }
    }
}

/// The NFLOG prefix of a logged rule: `keepstate rule 3 web drop` (`rule[3]` as the policy
/// errors number them; a rule without a name has none; the default is `keepstate default
/// drop`). A name keeps only `A-Z a-z 0-9 - _ . :` (anything else becomes `_`) and is cut so
/// the whole fits the kernel's 63 bytes with the action still at the end.
pub fn prefix(e: &LogEntry) -> String {
    let head = match e.rule {
        Some(i) => format!("keepstate rule {i}"),
        None => "keepstate default".to_string(),
    };
    let tail = format!(" {}", e.action.name());
    let room = MAX_PREFIX.saturating_sub(head.len() + tail.len() + 1);
    let name: String = e
        .name
        .as_deref()
        .unwrap_or("")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .take(room)
        .collect();
    if name.is_empty() {
        format!("{head}{tail}")
    } else {
        format!("{head} {name}{tail}")
    }
}

/// The kernel's NFLOG rules for one policy: one per logged rule, matching its slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRules {
    /// The instance's chain name (the rules go to `NAME-log`).
    pub chain: String,
    pub marks: LogMarks,
    pub group: u16,
    /// `(slot mark, prefix)` per logged rule.
    pub entries: Vec<(u32, String)>,
}

impl LogRules {
    pub fn new(chain: &str, marks: LogMarks, group: u16, entries: &[LogEntry]) -> LogRules {
        LogRules {
            chain: chain.to_string(),
            marks,
            group,
            entries: entries
                .iter()
                .map(|e| (marks.slot_mark(e.slot), prefix(e)))
                .collect(),
        }
    }
}

/// Packets one worker's logged rule may log: a bucket per slot, refilled at the worker's share
/// of the rate. Reset when the policy changes (its slots mean other rules).
#[derive(Debug)]
struct Limiter {
    /// The policy the buckets belong to (its version and where it lives).
    policy: (u64, usize),
    buckets: Vec<Bucket>,
}

/// One worker's logging: the mark layout and its rate limits. Lives in the worker's
/// `Pipeline` (one thread; the buckets are its own, so nothing is shared or locked).
#[derive(Debug)]
pub struct Logging {
    pub marks: LogMarks,
    /// This worker's share of `log_rate` (per second) and `log_burst`, per logged rule.
    pub rate: u64,
    pub burst: u64,
    limiter: RefCell<Limiter>,
}

impl Default for Logging {
    fn default() -> Self {
        Logging::new(
            LogMarks::default(),
            u64::from(LOG_RATE),
            u64::from(LOG_BURST),
        )
    }
}

impl Logging {
    /// `rate` and `burst` are this worker's share (see [`Logging::share`]).
    pub fn new(marks: LogMarks, rate: u64, burst: u64) -> Logging {
        Logging {
            marks,
            rate,
            burst,
            limiter: RefCell::new(Limiter {
                policy: (u64::MAX, 0),
                buckets: vec![],
            }),
        }
    }

    /// One of `workers` workers' share of a rate and burst: each rounded up, so a rule logs
    /// at most `workers * ceil(burst / workers)` packets at once and `workers * ceil(rate /
    /// workers)` a second after that.
    pub fn share(total: u32, workers: usize) -> u64 {
        u64::from(total).div_ceil(workers.max(1) as u64).max(1)
    }

    /// The verdict of a packet that `slot` (of `policy`) decided: marked for logging when the
    /// slot is logged and its bucket has a token, else `verdict` unchanged (counted as
    /// suppressed when over the rate).
    #[cold]
    pub fn apply(
        &self,
        policy: &ActivePolicy,
        slot: u16,
        verdict: Verdict,
        now: Instant,
        stats: &WorkerStats,
    ) -> Verdict {
        if slot == 0 {
            return verdict;
        }
        let mut l = self.limiter.borrow_mut();
        let key = (policy.version, policy as *const ActivePolicy as usize);
        if l.policy != key {
            let n = policy.compiled.log_entries().len();
            l.policy = key;
            l.buckets = (0..n)
                .map(|_| Bucket::new(self.rate, self.burst, now))
                .collect();
        }
        let granted = l
            .buckets
            .get_mut(usize::from(slot) - 1)
            .is_some_and(|b| b.try_take(now, 1));
        if granted {
            stats.log_packets.fetch_add(1, Relaxed);
            self.marks.logged(verdict, slot)
        } else {
            stats.log_suppressed.fetch_add(1, Relaxed);
            verdict
        }
    }
}

/// How the kernel's NFLOG rules are doing, for the metrics.
#[derive(Debug, Default)]
pub struct LogStatus {
    /// Version of the policy whose NFLOG rules are installed (meaningful once `installs` > 0).
    pub version: AtomicU64,
    /// Successful installs of a policy's NFLOG rules.
    pub installs: AtomicU64,
    /// Installs that failed (each retried after 5 s; the policy is enforced regardless, only
    /// its log prefixes are missing or stale).
    pub failures: AtomicU64,
}

/// Keeps the kernel's NFLOG rules those of the enforced policy, whatever loaded it (the policy
/// file, SIGHUP, Raft): the main loop calls [`Installer::sync`] every tick; it does something
/// only when the policy's logged rules differ from the installed ones.
#[derive(Debug)]
pub struct Installer {
    chain: String,
    marks: LogMarks,
    group: u16,
    /// The last policy seen (held, so its address cannot be reused by a newer one).
    seen: Option<Arc<ActivePolicy>>,
    installed: Option<LogRules>,
    retry_at: Option<Instant>,
    pub status: Arc<LogStatus>,
}

impl Installer {
    pub fn new(chain: &str, marks: LogMarks, group: u16) -> Installer {
        Installer {
            chain: chain.to_string(),
            marks,
            group,
            seen: None,
            installed: None,
            retry_at: None,
            status: Arc::new(LogStatus::default()),
        }
    }

    /// Install `policy`'s NFLOG rules unless they are the installed ones; a failure is logged,
    /// counted and retried after a while.
    pub fn sync(&mut self, policy: &Arc<ActivePolicy>, now: Instant) {
        let same = self.seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, policy));
        if same && self.retry_at.is_none() {
            return;
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        self.seen = Some(policy.clone());
        let want = LogRules::new(
            &self.chain,
            self.marks,
            self.group,
            policy.compiled.log_entries(),
        );
        if self.installed.as_ref() == Some(&want) {
            self.retry_at = None;
            self.status.version.store(policy.version, Relaxed);
            return;
        }
        match rules::install_log(&want) {
            Ok(()) => {
                tracing::info!(
                    version = policy.version,
                    logged = want.entries.len(),
                    group = self.group,
                    "NFLOG rules installed"
                );
                self.installed = Some(want);
                self.retry_at = None;
                self.status.version.store(policy.version, Relaxed);
                self.status.installs.fetch_add(1, Relaxed);
            }
            Err(e) => self.failed(policy.version, &e, now),
        }
    }

    fn failed(&mut self, version: u64, e: &RulesError, now: Instant) {
        self.status.failures.fetch_add(1, Relaxed);
        self.retry_at = Some(now + RETRY);
        tracing::error!(
            version,
            error = %e,
            "installing the NFLOG rules of the policy failed (its packets are still decided \
             as it says; their log lines may be missing or carry a previous prefix); retrying in 5 s"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, PolicyStore};

    fn entry(rule: Option<u32>, name: Option<&str>, action: Action) -> LogEntry {
        LogEntry {
            slot: 1,
            rule,
            name: name.map(str::to_string),
            action,
        }
    }

    #[test]
    fn the_mark_layout_is_checked() {
        let m = LogMarks::new(LOG_MARK, 0x40_0000).unwrap();
        assert_eq!(m.accept_bit(), 0x80_0000);
        assert_eq!(m.slot_mask(), 0x7f00_0000);
        assert_eq!(m.max_slots(), 127);
        assert_eq!(m.slot_mark(1), 0x0100_0000);
        assert_eq!(m.slot_mark(127), 0x7f00_0000);
        assert_eq!(LogMarks::new(0x3, 0x40_0000).unwrap().max_slots(), 1);
        for bad in [0, 0x1, 0x5, 0x7f80_0001, 0xffff_ffff] {
            assert!(LogMarks::new(bad, 0x40_0000).is_err(), "{bad:#x}");
        }
        let e = LogMarks::new(0x00c0_0000, 0x40_0000).unwrap_err();
        assert!(e.contains("overlaps datapath.reject_mark"), "{e}");
    }

    #[test]
    fn a_logged_verdict_carries_the_slot_and_what_to_do() {
        let m = LogMarks::default();
        assert_eq!(
            m.logged(Verdict::Accept, 3),
            Verdict::Repeat { mark: 0x0380_0000 }
        );
        assert_eq!(
            m.logged(Verdict::Drop, 3),
            Verdict::Repeat { mark: 0x0300_0000 }
        );
        // A reject keeps its bit: the kernel logs it, then rejects it.
        assert_eq!(
            m.logged(Verdict::Repeat { mark: 0x40_0000 }, 2),
            Verdict::Repeat { mark: 0x0240_0000 }
        );
        // The packet's other mark bits stay (the worker ORs them in afterwards).
        assert_eq!(
            super::super::worker::with_packet_mark(m.logged(Verdict::Drop, 1), 0x4000),
            Verdict::Repeat { mark: 0x0100_4000 }
        );
    }

    #[test]
    fn prefixes_name_the_rule_and_fit_the_kernel() {
        assert_eq!(
            prefix(&entry(Some(3), Some("web"), Action::Drop)),
            "keepstate rule 3 web drop"
        );
        assert_eq!(
            prefix(&entry(Some(0), None, Action::Accept)),
            "keepstate rule 0 accept"
        );
        assert_eq!(
            prefix(&entry(None, None, Action::Reject)),
            "keepstate default reject"
        );
        // Quotes, spaces, newlines and non-ASCII cannot reach the iptables-restore script.
        assert_eq!(
            prefix(&entry(Some(1), Some("a\"b c\n-A x;é"), Action::Drop)),
            "keepstate rule 1 a_b_c_-A_x__ drop"
        );
        let long = prefix(&entry(Some(12345), Some(&"n".repeat(100)), Action::Reject));
        assert_eq!(long.len(), MAX_PREFIX, "{long}");
        assert!(long.starts_with("keepstate rule 12345 nnn"), "{long}");
        assert!(long.ends_with("n reject"), "{long}");
    }

    fn logged_policy() -> Arc<PolicyStore> {
        let store = Arc::new(PolicyStore::new(Box::new(|_| None)));
        store
            .load_text(
                1,
                "t",
                "[[rule]]\nproto = \"udp\"\naction = \"drop\"\nlog = true\n\
                 [[rule]]\nproto = \"tcp\"\naction = \"accept\"\nlog = true\n",
            )
            .unwrap();
        store
    }

    #[test]
    fn each_rule_logs_up_to_its_bucket_and_the_rest_is_counted_as_suppressed() {
        let store = logged_policy();
        let p = store.current();
        let stats = WorkerStats::default();
        let log = Logging::new(LogMarks::default(), 10, 3);
        let t0 = Instant::now();
        let marked = |slot, t| log.apply(&p, slot, Verdict::Drop, t, &stats) != Verdict::Drop;
        assert_eq!((0..10).filter(|_| marked(1, t0)).count(), 3, "the burst");
        // The other rule has a bucket of its own.
        assert!(marked(2, t0));
        // 10/s: one more after 100 ms.
        assert!(marked(1, t0 + Duration::from_millis(100)));
        assert!(!marked(1, t0 + Duration::from_millis(100)));
        assert_eq!(stats.log_packets.load(Relaxed), 5);
        assert_eq!(stats.log_suppressed.load(Relaxed), 8);
        // Slot 0 (not logged) touches nothing.
        assert_eq!(
            log.apply(&p, 0, Verdict::Accept, t0, &stats),
            Verdict::Accept
        );
        assert_eq!(stats.log_packets.load(Relaxed), 5);
        assert_eq!(stats.log_suppressed.load(Relaxed), 8);
        // A new policy starts with full buckets.
        store
            .load_text(2, "t", "[[rule]]\naction = \"drop\"\nlog = true\n")
            .unwrap();
        let p2 = store.current();
        assert_eq!(
            (0..5)
                .filter(|_| log.apply(&p2, 1, Verdict::Drop, t0, &stats) != Verdict::Drop)
                .count(),
            3
        );
    }

    #[test]
    fn the_workers_share_rounds_up() {
        assert_eq!(Logging::share(10, 1), 10);
        assert_eq!(Logging::share(10, 3), 4);
        assert_eq!(Logging::share(1, 4), 1);
        assert_eq!(Logging::share(20, 0), 20);
    }

    #[test]
    fn the_log_rules_follow_the_policys_logged_rules() {
        let store = logged_policy();
        let r = LogRules::new(
            "KS",
            LogMarks::default(),
            5,
            store.current().compiled.log_entries(),
        );
        assert_eq!(
            r.entries,
            vec![
                (0x0100_0000, "keepstate rule 0 drop".to_string()),
                (0x0200_0000, "keepstate rule 1 accept".to_string())
            ]
        );
    }
}
