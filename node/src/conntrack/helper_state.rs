//! Per-connection state of an application helper, stored in the connection entry.
//!
//! Owns the plain data a line-oriented helper (FTP) keeps per direction: where the next
//! in-order byte is and the partial line seen so far. It lives here, in the connection, so that
//! state replication can ship it and a standby parses the first command after a failover.
//! Must not touch: parsing (that is `helper::ftp`), expectations, or I/O.

/// Longest line a helper reassembles; longer lines are skipped (and counted by the helper).
pub const LINE_MAX: usize = 512;

/// Which application helper a connection is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HelperKind {
    Ftp,
}

/// Reassembly state of one direction of a control connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineState {
    /// Sequence number of the next in-order payload byte; `None` until the first segment.
    pub next_seq: Option<u32>,
    /// Bytes of the current, unterminated line.
    pub len: u16,
    /// The current line grew past `LINE_MAX`: skip to the next newline without parsing.
    pub overflowed: bool,
    pub buf: [u8; LINE_MAX],
}

impl Default for LineState {
    fn default() -> Self {
        LineState {
            next_seq: None,
            len: 0,
            overflowed: false,
            buf: [0; LINE_MAX],
        }
    }
}

/// Helper state of one connection, indexed by `Direction as usize` (Original = 0, Reply = 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperState {
    pub kind: HelperKind,
    pub dir: [LineState; 2],
}

impl HelperState {
    pub fn new(kind: HelperKind) -> Self {
        HelperState {
            kind,
            dir: [LineState::default(), LineState::default()],
        }
    }
}
