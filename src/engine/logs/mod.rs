//! The log pipeline (architecture.md §4): Pantavisor's log tree → records → a
//! bounded on-disk spool → each backend, acknowledged (at-least-once).

pub mod parse;
pub mod spool;
pub mod tail;
