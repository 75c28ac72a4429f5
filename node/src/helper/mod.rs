//! Application-layer helpers attached to tracked control connections (FTP today).
