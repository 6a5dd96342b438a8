//! Map layouts and pure packet logic shared by the Ligo eBPF programs
//! (`ligo-fabric-ebpf`) and the node daemon (`ligo-fabric`).
//!
//! Everything here is `no_std`, allocation-free and unit-tested on the host:
//! the eBPF programs only glue these pieces to packet memory.
#![no_std]

pub mod checksum;
pub mod drop_reason;
pub mod headers;
pub mod maps;
pub mod model;
pub mod prefix;

pub use drop_reason::DropReason;
