//! Userspace connection tracker: a sans-IO state machine driven by `track(now, &packet)`.

pub mod helper_state;

/// The connection-tracking state a packet is seen in, as the policy matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
}

/// Direction of a packet relative to the connection's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    Original = 0,
    Reply = 1,
}
