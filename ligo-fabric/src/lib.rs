//! Ligo fabric node daemon: configuration, desired state, map and route
//! reconciliation, program loading, and the `inspect` views. The binary in
//! `main.rs` is a thin CLI over these modules.

pub mod clock;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod fabric_maps;
pub mod host;
pub mod inspect;
pub mod kube_source;
pub mod metrics;
pub mod programs;
pub mod routes;
pub mod source;
pub mod tunnel;
pub mod tunnel_process;
