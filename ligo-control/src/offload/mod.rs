//! Running pods across a peering, as pure functions the controller's shell
//! (`controller::offload`) feeds: the provider's offer (`inventory`), the
//! virtual node standing for it (`virtual_node`), and the pods bound to it
//! and their copies there (`pods`).

pub mod inventory;
pub mod pod_facts;
pub mod pods;
pub mod quantity;
pub mod reflect;
pub mod virtual_node;
