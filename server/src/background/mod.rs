//! The server's background loops. Each takes the store and the wakers (and the settings it
//! needs), never a surface's state, and ends with the server's shutdown token.
//!
//! - [`listener`]: ready notifications from every replica, into this server's wake-ups;
//! - [`timers`]: the wake-ups of suspended runs whose time has come;
//! - [`reaper`]: expired leases, timeouts and overdue sleepers; one server per database.

pub mod listener;
pub mod reaper;
pub mod timers;
