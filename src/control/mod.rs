//! The control plane's socket: protocol types, the server inside the proxy, and the client
//! that `intermission ctl` and the tests use.

pub mod client;
pub mod protocol;
pub mod server;
