//! Time as the sans-IO cores see it: an explicit `now` passed in by the shell.
//!
//! Owns only the timestamp type. The cores never read a clock; the shells read a monotonic
//! clock once per batch and pass it down.

/// Milliseconds since an arbitrary, fixed origin (the shell uses a monotonic clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    #[inline]
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }
    #[inline]
    pub const fn from_secs(s: u64) -> Self {
        Timestamp(s * 1000)
    }
    #[inline]
    pub const fn as_millis(self) -> u64 {
        self.0
    }
    /// `self + d`, saturating.
    #[inline]
    pub fn plus(self, d: std::time::Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_millis() as u64))
    }
    /// Time from `earlier` to `self`, zero if `earlier` is later.
    #[inline]
    pub fn since(self, earlier: Timestamp) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}
