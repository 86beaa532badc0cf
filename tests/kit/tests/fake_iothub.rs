//! The fake IoT Hub's rules seen by a plain MQTT client (rumqttc over TLS), so
//! that the bridge's tests run against a hub that refuses what IoT Hub refuses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pv_testkit::iothub::{FakeIotHub, sas};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

const HOST: &str = "fake-hub.azure-devices.net";
const KEY: &str = "a2l0LXRlc3Qta2V5LWZvci10aGUtZmFrZS1odWI=";

fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &str| {
        let out = std::process::Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir)
            .output()
            .expect("openssl is needed: apt-get install -y openssl");
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    run(&format!(
        "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=kit-CA"
    ));
    run(&format!(
        "req {ec} -keyout srv.key -out srv.csr -subj /CN={HOST}"
    ));
    std::fs::write(
        dir.join("srv.cnf"),
        format!("subjectAltName=DNS:{HOST},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    run(
        "x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile srv.cnf",
    );
    (dir.join("ca.pem"), dir.join("srv.pem"), dir.join("srv.key"))
}

/// TLS trusting only the kit's CA.
fn tls_to(ca: &Path) -> Transport {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(cfg)))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(resource: &str, se: u64) -> String {
    let sr = resource.replace('/', "%2F");
    let sig = sas::hmac_b64(KEY, format!("{sr}\n{se}").as_bytes()).unwrap();
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={se}",
        sig.replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    )
}

struct Kit {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    hub: FakeIotHub,
}

async fn kit() -> Kit {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path());
    let hub = FakeIotHub::local(HOST, &cert, &key, None).await.unwrap();
    hub.add_device("d1", KEY);
    Kit { _dir: dir, ca, hub }
}

fn client(k: &Kit, id: &str, password: String) -> (AsyncClient, rumqttc::EventLoop) {
    let addr = k.hub.mqtt_addr();
    // The socket goes to 127.0.0.1 (in the certificate too); the user name names the hub.
    let mut o = MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_credentials(format!("{HOST}/{id}/?api-version=2021-04-12"), password);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(300 * 1024, 300 * 1024);
    o.set_transport(tls_to(&k.ca));
    AsyncClient::new(o, 16)
}

/// Polls until `f` accepts an event; `Err` with the connection error.
async fn until(
    ev: &mut rumqttc::EventLoop,
    within: Duration,
    mut f: impl FnMut(&Event) -> bool,
) -> Result<Event, String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ev.poll()).await {
            Err(_) => return Err("timeout".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(e)) if f(&e) => return Ok(e),
            Ok(Ok(_)) => {}
        }
    }
}

fn dev_token(se: u64) -> String {
    token(&format!("{HOST}/devices/d1"), se)
}

fn connack(e: &Event) -> bool {
    matches!(e, Event::Incoming(Packet::ConnAck(_)))
}

#[tokio::test]
async fn connect_rules_tokens_and_one_connection_per_device() {
    let k = kit().await;
    // A good token connects; an expired one, a wrong key, a foreign host do not.
    let (_c, mut ev) = client(&k, "d1", dev_token(now() + 60));
    until(&mut ev, Duration::from_secs(5), connack)
        .await
        .unwrap();
    assert!(k.hub.connected("d1"));
    for (pw, want) in [
        (dev_token(now() - 1), "expired"),
        (
            token(&format!("{HOST}/devices/d2"), now() + 60),
            "does not cover",
        ),
        ("SharedAccessSignature sr=x".to_owned(), "not a SAS token"),
    ] {
        let (_c2, mut ev2) = client(&k, "d1", pw);
        let e = until(&mut ev2, Duration::from_secs(5), connack)
            .await
            .unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let r = k.hub.refusals();
        assert!(r.last().unwrap().contains(want), "{r:?}");
    }
    // A second connection with the same id closes the first.
    let (_c3, mut ev3) = client(&k, "d1", dev_token(now() + 60));
    until(&mut ev3, Duration::from_secs(5), connack)
        .await
        .unwrap();
    let e = until(&mut ev, Duration::from_secs(5), |_| false)
        .await
        .unwrap_err();
    assert_ne!(e, "timeout");
    assert!(
        k.hub.refusals().iter().any(|r| r.contains("400027")),
        "{:?}",
        k.hub.refusals()
    );
    assert_eq!(k.hub.connects("d1"), 2);
}

#[tokio::test]
async fn the_connection_is_cut_when_the_token_expires() {
    let k = kit().await;
    let (_c, mut ev) = client(&k, "d1", dev_token(now() + 2));
    until(&mut ev, Duration::from_secs(5), connack)
        .await
        .unwrap();
    let t = Instant::now();
    let e = until(&mut ev, Duration::from_secs(10), |_| false)
        .await
        .unwrap_err();
    assert_ne!(e, "timeout");
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(
        k.hub
            .refusals()
            .iter()
            .any(|r| r.contains("SAS token expired")),
        "{:?}",
        k.hub.refusals()
    );
}

#[tokio::test]
async fn twin_requests_merge_patches_and_refuse_illegal_documents() {
    let k = kit().await;
    let (c, mut ev) = client(&k, "d1", dev_token(now() + 60));
    until(&mut ev, Duration::from_secs(5), connack)
        .await
        .unwrap();
    c.subscribe("$iothub/twin/res/#", QoS::ExactlyOnce)
        .await
        .unwrap();
    let granted = until(&mut ev, Duration::from_secs(5), |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap();
    assert!(
        format!("{granted:?}").contains("AtLeastOnce"),
        "QoS 2 is granted as 1: {granted:?}"
    );
    let mut answer = async |topic: String, body: Value| {
        c.publish(topic, QoS::AtMostOnce, false, body.to_string())
            .await
            .unwrap();
        match until(&mut ev, Duration::from_secs(5), |e| {
            matches!(e, Event::Incoming(Packet::Publish(_)))
        })
        .await
        .unwrap()
        {
            Event::Incoming(Packet::Publish(p)) => (p.topic.clone(), p.payload.to_vec()),
            _ => unreachable!(),
        }
    };
    let (t, _) = answer(
        "$iothub/twin/PATCH/properties/reported/?$rid=1".into(),
        json!({"a": {"b": 1, "c": 2}}),
    )
    .await;
    assert_eq!(t, "$iothub/twin/res/204/?$rid=1&$version=2");
    let (t, _) = answer(
        "$iothub/twin/PATCH/properties/reported/?$rid=2".into(),
        json!({"a": {"b": null}, "d": [1]}),
    )
    .await;
    assert_eq!(t, "$iothub/twin/res/204/?$rid=2&$version=3");
    let (t, _) = answer(
        "$iothub/twin/PATCH/properties/reported/?$rid=3".into(),
        json!({"a.b": 1}),
    )
    .await;
    assert_eq!(t, "$iothub/twin/res/400/?$rid=3");
    let (t, _) = answer(
        "$iothub/twin/PATCH/properties/reported/?$rid=4".into(),
        json!({"s": "x".repeat(4097)}),
    )
    .await;
    assert_eq!(t, "$iothub/twin/res/400/?$rid=4");
    k.hub.fail_twin(429, 1);
    let (t, _) = answer("$iothub/twin/GET/?$rid=5".into(), Value::Null).await;
    assert_eq!(t, "$iothub/twin/res/429/?$rid=5");
    let (t, body) = answer("$iothub/twin/GET/?$rid=6".into(), Value::Null).await;
    assert_eq!(t, "$iothub/twin/res/200/?$rid=6");
    let twin: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        twin["reported"],
        json!({"a": {"c": 2}, "d": [1], "$version": 3})
    );
    assert_eq!(twin["desired"], json!({"$version": 1}));
}

#[tokio::test]
async fn desired_patches_go_only_to_connected_devices_and_rule_breakers_are_cut() {
    let k = kit().await;
    // Offline: the patch is stored, not queued.
    k.hub.update_desired("d1", json!({"x": 1})).unwrap();
    let (c, mut ev) = client(&k, "d1", dev_token(now() + 60));
    until(&mut ev, Duration::from_secs(5), connack)
        .await
        .unwrap();
    c.subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtMostOnce)
        .await
        .unwrap();
    c.subscribe("$iothub/methods/POST/#", QoS::AtMostOnce)
        .await
        .unwrap();
    let mut subacks = 0;
    let e = until(&mut ev, Duration::from_secs(2), |e| {
        if matches!(e, Event::Incoming(Packet::SubAck(_))) {
            subacks += 1;
        }
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await;
    assert_eq!(
        e.unwrap_err(),
        "timeout",
        "nothing is queued for offline devices"
    );
    assert_eq!(subacks, 2);
    let v = k.hub.update_desired("d1", json!({"y": {"z": 2}})).unwrap();
    assert_eq!(v, 3);
    match until(&mut ev, Duration::from_secs(5), |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    .unwrap()
    {
        Event::Incoming(Packet::Publish(p)) => {
            assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=3");
            assert_eq!(
                serde_json::from_slice::<Value>(&p.payload).unwrap(),
                json!({"y": {"z": 2}, "$version": 3})
            );
        }
        _ => unreachable!(),
    }
    // A method nobody answers times out; an offline device is 404.
    let r = k
        .hub
        .invoke("d1", "slow", Value::Null, Duration::from_millis(300))
        .await;
    assert_eq!(r, pv_testkit::iothub::Invoked::Timeout);
    assert_eq!(
        k.hub
            .invoke("nobody", "x", Value::Null, Duration::from_secs(1))
            .await,
        pv_testkit::iothub::Invoked::Offline
    );
    // Publishing QoS 2 or to a topic IoT Hub does not know closes the connection.
    c.publish("devices/d1/messages/events/", QoS::ExactlyOnce, false, "x")
        .await
        .unwrap();
    let e = until(&mut ev, Duration::from_secs(5), |_| false)
        .await
        .unwrap_err();
    assert_ne!(e, "timeout");
    assert!(
        k.hub.refusals().iter().any(|r| r.contains("QoS 2")),
        "{:?}",
        k.hub.refusals()
    );
    let (c, mut ev) = client(&k, "d1", dev_token(now() + 60));
    until(&mut ev, Duration::from_secs(5), connack)
        .await
        .unwrap();
    c.subscribe("pv/d1/anything", QoS::AtMostOnce)
        .await
        .unwrap();
    let e = until(&mut ev, Duration::from_secs(5), |_| false)
        .await
        .unwrap_err();
    assert_ne!(e, "timeout");
    assert!(
        k.hub
            .refusals()
            .iter()
            .any(|r| r.contains("is not allowed")),
        "{:?}",
        k.hub.refusals()
    );
}

#[tokio::test]
async fn the_pv_fake_iothub_binary_serves_devices() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path());
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, sport) = (free(), free());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pv-fake-iothub"))
        .args([
            "--host-name",
            HOST,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--service-listen",
            &format!("127.0.0.1:{sport}"),
            "--device",
            &format!("d9={KEY}"),
        ])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(
        first,
        format!("device d9: HostName={HOST};DeviceId=d9;SharedAccessKey={KEY}")
    );
    let service = lines.next().unwrap().unwrap();
    assert!(
        service.starts_with(&format!(
            "service: HostName={HOST};SharedAccessKeyName=iothubowner;"
        )),
        "{service}"
    );
    // A device connects with a token from its connection string and reads its twin.
    let mut o = MqttOptions::new("d9", "127.0.0.1", port);
    o.set_credentials(
        format!("{HOST}/d9/?api-version=2021-04-12"),
        token(&format!("{HOST}/devices/d9"), now() + 60),
    );
    o.set_transport(tls_to(&ca));
    let (c, mut ev) = AsyncClient::new(o, 8);
    let mut got = None;
    for _ in 0..50 {
        match until(&mut ev, Duration::from_secs(5), connack).await {
            Ok(_) => {
                got = Some(());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(got.is_some(), "no CONNACK from pv-fake-iothub");
    c.subscribe("$iothub/twin/res/#", QoS::AtMostOnce)
        .await
        .unwrap();
    c.publish("$iothub/twin/GET/?$rid=1", QoS::AtMostOnce, false, "")
        .await
        .unwrap();
    let e = until(&mut ev, Duration::from_secs(5), |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    .unwrap();
    assert!(
        format!("{e:?}").contains("$iothub/twin/res/200/?$rid=1"),
        "{e:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
