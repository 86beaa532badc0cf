//! pv-bridge's HTTP/1.1: the response codec pv-ctrl and the client share
//! ([`codec`]), and a small client ([`Client`]) for object downloads and cloud APIs:
//! rustls with ring (system roots plus extra PEM anchors), HTTP CONNECT proxies with
//! `NO_PROXY`, redirects for GET, per-read timeouts, keep-alive reuse, bodies
//! streamed both ways with bounded memory.
//!
//! It replaces reqwest/hyper in device builds (about 700 KB of binary with unwind
//! tables; ADR 0009).

pub mod client;
pub mod codec;
mod fetch;
mod url;

pub use client::{Body, Client, ClientBuilder, Error, Response};
pub use fetch::{FetchError, resume_to_file};
pub use url::{Url, redact};
