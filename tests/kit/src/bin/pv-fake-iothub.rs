//! `pv-fake-iothub`: the test kit's fake Azure IoT Hub (with DPS) as a process,
//! for trying pv-bridge, Microsoft's SDKs or `az`-like tools against a hub on
//! loopback over TLS.
//!
//! ```text
//! pv-fake-iothub --host-name myhub.azure-devices.net --cert hub.pem --key hub.key \
//!     --listen 127.0.0.1:8883 --service-listen 127.0.0.1:8443 --device dev-1
//! ```
//! It prints each device's connection string and the service connection string.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use pv_testkit::iothub::{DpsSetup, FakeIotHub, Setup};

#[derive(Parser)]
#[command(
    name = "pv-fake-iothub",
    version,
    about = "A fake Azure IoT Hub on loopback (test kit)"
)]
struct Args {
    /// The hub's host name (what connection strings and tokens carry).
    #[arg(long, default_value = "fake-hub.azure-devices.net")]
    host_name: String,
    /// Device (MQTT over TLS) listener.
    #[arg(long, default_value = "127.0.0.1:8883")]
    listen: SocketAddr,
    /// Service REST (HTTPS) listener.
    #[arg(long, default_value = "127.0.0.1:8443")]
    service_listen: SocketAddr,
    /// TLS certificate chain (PEM) valid for the host name.
    #[arg(long)]
    cert: PathBuf,
    /// TLS private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA for X.509 device certificates.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// A device to register (`id` or `id=base64key`); repeatable.
    #[arg(long)]
    device: Vec<String>,
    /// DPS: ID scope and a group enrollment key (`scope=base64key`).
    #[arg(long)]
    dps_group: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    let hub = match FakeIotHub::start(Setup {
        host_name: a.host_name.clone(),
        cert_chain: &a.cert,
        key: &a.key,
        client_ca: a.client_ca.as_deref(),
        mqtt: a.listen,
        service: a.service_listen,
    })
    .await
    {
        Ok(h) => h,
        Err(e) => {
            eprintln!("pv-fake-iothub: cannot start: {e}");
            std::process::exit(2);
        }
    };
    for d in &a.device {
        let (id, key) = d
            .split_once('=')
            .unwrap_or((d, "cHYtYnJpZGdlLWRldmljZS1rZXk="));
        println!("device {id}: {}", hub.add_device(id, key));
    }
    if let Some(g) = &a.dps_group {
        let Some((scope, key)) = g.split_once('=') else {
            eprintln!("pv-fake-iothub: --dps-group wants scope=base64key");
            std::process::exit(2);
        };
        hub.set_dps(DpsSetup {
            id_scope: scope.to_owned(),
            group_key: Some(key.to_owned()),
            ..DpsSetup::default()
        });
        println!("DPS: scope {scope} on {}", hub.mqtt_addr());
    }
    println!("service: {}", hub.service_connection_string(&a.host_name));
    println!(
        "listening: devices {} service {}",
        hub.mqtt_addr(),
        hub.service_addr()
    );
    let _ = tokio::signal::ctrl_c().await;
}
