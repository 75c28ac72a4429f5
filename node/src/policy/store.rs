//! The live policy: the single place the datapath reads its rules from.
//!
//! Owns the currently enforced policy (version, source text, compiled matcher) behind an
//! `ArcSwap`: a new policy is parsed, validated and compiled first and swapped in with one
//! atomic pointer store, so a worker evaluates every packet against exactly one whole policy.
//! A failed load leaves the running policy untouched. Where the text comes from (a local file
//! today, applied Raft entries tomorrow) is the caller's business.
//!
//! Also owns the `Interfaces` registry the compiled policies share: every load re-resolves it
//! first, and the datapath's link listener keeps it current in between (`interfaces()`).
//!
//! Loads are serialized, so each new version carries the per-rule counters of the one it
//! replaces (`CompiledPolicy::carry_from`) for the rules that did not change.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;

use super::compile::CompiledPolicy;
use super::file::{self, PolicyError};
use super::ifaces::Interfaces;
pub use super::ifaces::Resolver;
use super::model::{Action, PolicyModel};

/// A policy being enforced.
#[derive(Debug)]
pub struct ActivePolicy {
    /// 0 = the built-in fail-closed policy (drop everything) before any policy is loaded.
    pub version: u64,
    pub origin: String,
    pub text: String,
    pub compiled: CompiledPolicy,
    pub warnings: Vec<String>,
}

pub struct PolicyStore {
    current: ArcSwap<ActivePolicy>,
    ifaces: Arc<Interfaces>,
    /// Most logged rules (and default) a policy may have: what the datapath's log mark bits
    /// can number.
    max_logged: usize,
    /// Held while a load builds and swaps a version, so none is built from a stale predecessor.
    loading: Mutex<()>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("version", &self.current.load().version)
            .finish()
    }
}

/// Parse and validate without compiling or applying (what a proposer checks first).
pub fn validate(text: &str, origin: &str) -> Result<PolicyModel, PolicyError> {
    file::parse(text, origin)
}

impl PolicyStore {
    /// A store enforcing the fail-closed empty policy (default drop) until one is loaded.
    /// `resolve` maps interface names to ifindexes for the interface registry.
    pub fn new(resolve: Resolver) -> Self {
        let ifaces = Arc::new(Interfaces::new(resolve));
        let empty = PolicyModel {
            default: Action::Drop,
            default_log: None,
            rules: vec![],
        };
        let (compiled, _) = CompiledPolicy::compile(&empty, &ifaces);
        let active = ActivePolicy {
            version: 0,
            origin: "built-in".into(),
            text: String::new(),
            compiled,
            warnings: vec![],
        };
        PolicyStore {
            current: ArcSwap::from_pointee(active),
            ifaces,
            // Until the datapath says how many its mark can number: what a slot can.
            max_logged: usize::from(u16::MAX),
            loading: Mutex::new(()),
        }
    }

    /// Refuse policies that log more than `max` rules (counting `default_log`).
    pub fn with_max_logged(mut self, max: usize) -> Self {
        self.max_logged = max;
        self
    }

    fn parse(&self, text: &str, origin: &str) -> Result<PolicyModel, PolicyError> {
        let model = file::parse(text, origin)?;
        file::check_logged(&model, origin, self.max_logged)?;
        Ok(model)
    }

    /// The interface registry of this store's policies, for the link listener that keeps it
    /// current.
    pub fn interfaces(&self) -> &Arc<Interfaces> {
        &self.ifaces
    }

    /// Re-resolve every interface name the policies use, logging what changed.
    pub fn resync_interfaces(&self) {
        for c in self.ifaces.resync() {
            tracing::info!(interface = %c.name, old = c.old, new = c.new, "policy interface re-resolved");
        }
    }

    /// Validate, compile and atomically enforce `text` as `version`, carrying the counters of
    /// the rules that did not change. On error nothing changes.
    pub fn load_text(
        &self,
        version: u64,
        origin: &str,
        text: &str,
    ) -> Result<Arc<ActivePolicy>, PolicyError> {
        let model = self.parse(text, origin)?;
        let _loading = self.loading.lock();
        self.resync_interfaces();
        let (mut compiled, warnings) = CompiledPolicy::compile(&model, &self.ifaces);
        compiled.carry_from(&self.current.load().compiled);
        let active = Arc::new(ActivePolicy {
            version,
            origin: origin.to_string(),
            text: text.to_string(),
            compiled,
            warnings,
        });
        self.current.store(active.clone());
        Ok(active)
    }

    /// Parse and compile `text` without enforcing it: what a proposer checks before a policy
    /// enters the Raft log. Returns the rule count and the compiler's warnings.
    pub fn check(&self, text: &str, origin: &str) -> Result<(usize, Vec<String>), PolicyError> {
        let model = self.parse(text, origin)?;
        self.resync_interfaces();
        let (compiled, warnings) = CompiledPolicy::compile(&model, &self.ifaces);
        Ok((compiled.rule_count(), warnings))
    }

    /// The policy in force; cheap enough to call once per batch.
    #[inline]
    pub fn current(&self) -> Guard<Arc<ActivePolicy>> {
        self.current.load()
    }
}
