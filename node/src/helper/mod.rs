//! Application-layer helpers attached to tracked control connections (FTP today).
//!
//! A helper reads the payload of its control connection and asks for expectations; it never
//! touches the table itself (`datapath::worker` glues the two under the shard's lock).

pub mod ftp;
