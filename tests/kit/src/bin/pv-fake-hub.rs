//! `pv-fake-hub`: the test kit's fake Pantacor Hub as a process, for trying
//! pv-bridge (or `curl`, or `pvr`) against a hub on loopback.
//!
//! ```text
//! pv-fake-hub --listen 127.0.0.1:12365
//! pv-fake-hub --listen 127.0.0.1:12366 --cert hub.pem --key hub.key
//! ```
//! The built-in user is `user1` / `user1pass`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pv_testkit::hub::{FakeHub, HubConfig, USER, USER_PASSWORD};

#[derive(Parser)]
#[command(
    name = "pv-fake-hub",
    version,
    about = "A fake Pantacor Hub on loopback (test kit)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:12365")]
    listen: String,
    /// TLS certificate chain (PEM); serves HTTPS with --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Lifetime of session tokens.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// Only allow cancelling NEW steps, as the open-source hub does.
    #[arg(long)]
    oss_cancel: bool,
    /// Base URL for signed object URLs (default: the listen address).
    #[arg(long)]
    public_url: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let mut cfg = HubConfig {
        token_lifetime: args.token_lifetime,
        public_url: args.public_url,
        ..HubConfig::default()
    };
    if args.oss_cancel {
        cfg.cancel_from = vec!["NEW".into()];
    }
    let tls = args.cert.as_deref().zip(args.key.as_deref());
    let hub = match FakeHub::start_on(&args.listen, cfg, tls).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("pv-fake-hub: cannot listen on {}: {e}", args.listen);
            std::process::exit(2);
        }
    };
    println!(
        "pv-fake-hub listening on {} (user {USER} / {USER_PASSWORD})",
        hub.url()
    );
    let _ = tokio::signal::ctrl_c().await;
}
