//! The live policy: the single place the datapath reads its rules from.
//!
//! Owns the currently enforced policy (version, source text, compiled matcher) behind an
//! `ArcSwap`: a new policy is parsed, validated and compiled first and swapped in with one
//! atomic pointer store, so a worker evaluates every packet against exactly one whole policy.
//! A failed load leaves the running policy untouched. Where the text comes from (a local file
//! today, applied Raft entries tomorrow) is the caller's business.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use super::compile::CompiledPolicy;
use super::file::{self, PolicyError};
use super::model::{Action, PolicyModel};

/// Maps an interface name to its ifindex.
pub type Resolver = Box<dyn Fn(&str) -> Option<u32> + Send + Sync>;

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
    resolve: Resolver,
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
    pub fn new(resolve: Resolver) -> Self {
        let empty = PolicyModel {
            default: Action::Drop,
            rules: vec![],
        };
        let (compiled, _) = CompiledPolicy::compile(&empty, &*resolve);
        let active = ActivePolicy {
            version: 0,
            origin: "built-in".into(),
            text: String::new(),
            compiled,
            warnings: vec![],
        };
        PolicyStore {
            current: ArcSwap::from_pointee(active),
            resolve,
        }
    }

    /// Validate, compile and atomically enforce `text` as `version`. On error nothing changes.
    pub fn load_text(
        &self,
        version: u64,
        origin: &str,
        text: &str,
    ) -> Result<Arc<ActivePolicy>, PolicyError> {
        let model = file::parse(text, origin)?;
        let (compiled, warnings) = CompiledPolicy::compile(&model, &*self.resolve);
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
        let model = file::parse(text, origin)?;
        let (compiled, warnings) = CompiledPolicy::compile(&model, &*self.resolve);
        Ok((compiled.rule_count(), warnings))
    }

    /// The policy in force; cheap enough to call once per batch.
    #[inline]
    pub fn current(&self) -> Guard<Arc<ActivePolicy>> {
        self.current.load()
    }
}
