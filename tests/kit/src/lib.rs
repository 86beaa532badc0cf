//! Test kit for pv-bridge. Depends on nothing of the engine, so that the engine is
//! tested against independent implementations of the protocols it speaks.
//!
//! - [`sim`]: pv-sim, a protocol-faithful simulation of Pantavisor's pv-ctrl.
//! - [`objects`]: an HTTP object server with Range, ETags and fault injection.
//! - [`hub`]: a fake Pantacor Hub (device API, the user calls of `pvr`, faults).

pub mod ddi;
pub mod hub;
pub mod iothub;
pub mod objects;
pub mod sim;
